"""SFT under Lightning: data module, module (token mean / mix / NGDiff + auto LR) and
diagnostics, on a small tiny VLM and the real task."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch

from percepdsl.ir import SFTStageIR
from percepdsl_runtime.encoding import Encoder
from percepdsl_runtime.models import load_hf
from percepdsl_runtime.sft import LengthBucketSampler, SFTDataModule, SFTModule, chunked_role_losses, per_role_grad_norms, role_losses

RULES = [
    {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>"},
    {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>"},
    {"role": "reasoning", "kind": "rest"},
]
NGDIFF = {"kind": "ngdiff", "groups": [["perception"], ["reasoning", "answer"]]}


@pytest.fixture(scope="module")
def encoder(tiny):
    return Encoder(tiny, RULES)


@pytest.fixture(scope="module")
def datamodule(task, encoder):
    dm = SFTDataModule(task, encoder, batch_size=4, seed=3, n_items=48, bucket=True)
    dm.setup()
    return dm


def _trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision=kw.pop("precision", "bf16-mixed"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


def _fresh_module(tiny, encoder, loss, steps: int = 20, lr=3e-3, **kw) -> SFTModule:
    loaded = load_hf(tiny.path)  # fresh weights for every training test
    return SFTModule(loaded, SFTStageIR(name="t", steps=steps, lr=lr, loss=loss), encoder.role_names, **kw)


# ------------------------------------------------------------------ data
def test_batches_are_deterministic_and_bucketed(datamodule, task, encoder) -> None:
    order = lambda dm: [b for b in dm.sampler().batches()]  # noqa: E731
    again = SFTDataModule(task, encoder, batch_size=4, seed=3, n_items=48, bucket=True)
    assert order(datamodule) == order(again)
    other = SFTDataModule(task, encoder, batch_size=4, seed=4, n_items=48, bucket=True)
    assert order(datamodule) != order(other)
    s = datamodule.sampler()
    first = s.batches()
    s.set_epoch(1)
    assert s.batches() != first and sorted(sum(s.batches(), [])) == list(range(48))
    flat = LengthBucketSampler(datamodule.dataset.lengths, 4, seed=3, window=1)
    assert datamodule.sampler().padding_fraction() <= flat.padding_fraction()
    # DDP: at every step the ranks' batches together are the batch of one process with the global
    # batch size (5 × 3), and they cover every item once; the last global batch of 48 = 3·15 + 3
    # items gives each rank one item
    lengths = datamodule.dataset.lengths
    for window in (1, 50):
        shards = [LengthBucketSampler(lengths, 5, seed=3, window=window, rank=r, world=3) for r in range(3)]
        single = LengthBucketSampler(lengths, 15, seed=3, window=window)
        assert all(len(sh) == len(sh.batches()) == len(single) == 4 for sh in shards)
        steps = list(zip(*(sh.batches() for sh in shards)))
        assert [sorted(sum(parts, [])) for parts in steps] == [sorted(b) for b in single.batches()]
        assert [len(b) for b in steps[-1]] in ([5, 5, 5], [1, 1, 1])
    assert sorted(i for sh in shards for b in sh for i in b) == list(range(48))
    assert len(LengthBucketSampler(lengths[:46], 5, seed=3, world=3)) == 3  # a last global batch of 1 item is left out


def test_loader_batches(datamodule) -> None:
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["role_ids"].shape
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape[0] == 4
    assert int(batch["n_target"].sum()) == int((batch["labels"] != -100).sum())


# ------------------------------------------------------------------ training
def test_token_mean_trains_and_logs(tiny, encoder, datamodule) -> None:
    sched = {"kind": "cosine", "start": 3e-3, "end": 0.0, "warmup": 2}
    module = _fresh_module(tiny, encoder, {"kind": "token_mean"}, lr=sched, grad_clip=1.0)
    history: list[dict[str, float]] = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    _trainer(20, callbacks=[Keep()]).fit(module, datamodule=datamodule)
    last = history[-1]
    for key in ("loss", "lr", "loss/perception", "token_share/perception", "loss_share/reasoning", "eff_lambda"):
        assert key in last, key
    assert history[0]["lr"] == 0.0 and history[2]["lr"] == pytest.approx(3e-3)  # warmup, then the peak
    assert last["eff_lambda"] == pytest.approx(last["token_share/perception"])
    assert sum(history[-1][f"token_share/{r}"] for r in encoder.role_names) == pytest.approx(1.0)
    assert sum(h["loss"] for h in history[-4:]) < sum(h["loss"] for h in history[:4])  # it learns


def test_mix_weight_zero_keeps_perception_out(tiny, encoder, datamodule) -> None:
    spec = {"kind": "mix", "terms": [{"weight": 0.0, "roles": ["perception"]}, {"weight": 1.0, "roles": ["reasoning", "answer"]}]}
    module = _fresh_module(tiny, encoder, spec)
    _trainer(2, precision="32-true").fit(module, datamodule=datamodule)
    assert float(_trainer_metric(module, "eff_lambda")) == 0.0


def _trainer_metric(module: SFTModule, key: str) -> float:
    return float(module.trainer.callback_metrics[key])


@pytest.mark.parametrize("auto_lr", [False, True])
def test_ngdiff_manual_optimisation(tiny, encoder, datamodule, auto_lr: bool) -> None:
    module = _fresh_module(tiny, encoder, NGDIFF | {"auto_lr": auto_lr, "auto_lr_every": 2}, grad_clip=5.0)
    before = [p.detach().clone() for p in module.model.parameters()]
    _trainer(4).fit(module, datamodule=datamodule)
    m = module.trainer.callback_metrics
    assert module.trainer.global_step == 4  # one optimiser step per batch
    assert 0.0 < float(m["eff_lambda"]) < 1.0
    assert "grad_norm/perception" in m and "grad_cos" in m and -1.0 <= float(m["grad_cos"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))
    if auto_lr:
        assert "auto_lr_t" in m and module.lr_scale != 1.0


def test_only_loss_is_logged_between_logger_steps(tiny, encoder, datamodule) -> None:
    module = _fresh_module(tiny, encoder, {"kind": "token_mean"})
    keys: list[set[str]] = []

    class Keys(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            keys.append(set(trainer.callback_metrics))

    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[Keys()],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=2,
    )
    trainer.fit(module, datamodule=datamodule)
    assert keys[0] == {"loss"} and {"eff_lambda", "loss/perception", "lr"} <= keys[1]


def test_clip_bounds_the_global_norm(tiny, encoder, datamodule) -> None:
    module = _fresh_module(tiny, encoder, {"kind": "token_mean"})
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    module._clip(1.0)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.model.parameters()]))
    assert float(total) == pytest.approx(1.0, rel=1e-4)


# ------------------------------------------------------------------ diagnostics + checkpoints
def test_per_role_grad_norms(tiny, encoder, datamodule) -> None:
    module = _fresh_module(tiny, encoder, NGDIFF)
    batch = next(iter(datamodule.train_dataloader()))
    out = per_role_grad_norms(module, batch)
    for r in encoder.role_names:
        assert out[f"grad_norm/{r}"] > 0
    assert -1.0 <= out["grad_cos/perception/reasoning"] <= 1.0
    assert all(p.grad is None for p in module.model.parameters())  # .grad untouched


def test_resume_restores_ngdiff_state(tiny, encoder, datamodule, tmp_path) -> None:
    module = _fresh_module(tiny, encoder, NGDIFF | {"auto_lr": True, "auto_lr_every": 1})
    trainer = _trainer(2)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "resume.ckpt")
    again = _fresh_module(tiny, encoder, NGDIFF | {"auto_lr": True, "auto_lr_every": 100})
    again.on_load_checkpoint(torch.load(tmp_path / "resume.ckpt", weights_only=False))
    assert again.lr_scale == pytest.approx(module.lr_scale) and again.objective._norms == module.objective._norms


def test_a_lora_resume_checkpoint_holds_the_adapter_not_the_frozen_base(tiny, encoder, datamodule, tmp_path) -> None:
    """A LoRA stage's resume checkpoint leaves out the frozen base weights (the runner loads them
    from the parent before resuming: on a real checkpoint they are gigabytes written every 50
    steps); loading it into a fresh module from the same parent gives the trained weights."""
    from percepdsl.ir import LoraIR

    def module() -> SFTModule:
        loaded = load_hf(tiny.path, lora=LoraIR(r=4, alpha=8, dropout=0.0))
        return SFTModule(loaded, SFTStageIR(name="t", steps=2, lr=3e-2), encoder.role_names)

    trained = module()
    trainer = _trainer(2)
    trainer.fit(trained, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "resume.ckpt")
    saved = torch.load(tmp_path / "resume.ckpt", weights_only=False)["state_dict"]
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable and set(saved) - set(dict(trained.named_buffers())) == trainable
    again = module()
    _trainer(2).fit(again, datamodule=datamodule, ckpt_path=str(tmp_path / "resume.ckpt"))  # at max_steps: loads, trains nothing
    want, got = trained.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    "packing, groups",
    [
        (True, NGDIFF["groups"]),
        (False, NGDIFF["groups"]),
        # groups that end near each item's end: a short rest chunk
        (True, [["reasoning"], ["perception", "answer"]]),
    ],
)
def test_ngdiff_chunked_forward_gives_the_same_gradient(tiny, task, encoder, packing: bool, groups) -> None:
    """NGDiff's chunked forward (the prefix holding one group's targets, then the rest
    attending to its keys and values; padded items: one common prefix, a packed row: each
    item's own) gives the batch's per-role losses and the one-pass NGDiff gradient."""
    dm = SFTDataModule(task, encoder, batch_size=4, seed=3, n_items=48, packing=packing)
    batch = next(iter(dm.train_dataloader()))
    assert dm.packed == packing
    loss = {"kind": "ngdiff", "groups": groups}
    grads, logs = {}, {}
    for chunked in (True, False):
        module = _fresh_module(tiny, encoder, loss, chunked=chunked)
        module.model.train()
        _, logs[chunked] = module.ngdiff_backward(batch, step=0)
        grads[chunked] = [p.grad for p in module.model.parameters()]
    group, prefix, rest = module._chunk(batch)
    assert 0 < prefix["input_ids"].numel() < batch["input_ids"].numel() and (group == 0 or groups != NGDIFF["groups"])
    (head, head_counts), (sums, counts) = chunked_role_losses(module.model, prefix, rest, module.n_roles)
    ref_sums, ref_counts = role_losses(module.model, batch, module.n_roles)
    mine = [module.objective.role_names.index(r) for r in groups[group]]
    assert counts.tolist() == ref_counts.tolist() and all(head_counts[r] == counts[r] for r in mine) and head_counts[mine].sum() > 0
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    assert logs[True]["eff_lambda"] == pytest.approx(logs[False]["eff_lambda"], rel=1e-4)
    for a, b in zip(grads[True], grads[False]):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6, rtol=1e-4)


DDP_SCRIPT = """
import sys, torch, lightning as L
torch.set_num_threads(1)
from percepdsl_runtime.models import load_hf
from percepdsl_runtime.encoding import Encoder
from percepdsl.ir import SFTStageIR
from percepdsl_runtime.sft import SFTDataModule, SFTModule, build_trainer
from percepdsl_runtime.tasks import build_task
RULES = {rules!r}
if __name__ == "__main__":
    task = build_task("graph_coloring", {}, seed=0)
    loaded = load_hf(sys.argv[1])
    enc = Encoder(loaded, RULES)
    loss = {"kind": "ngdiff", "groups": [["perception"], ["reasoning", "answer"]], "auto_lr": True, "auto_lr_every": 1}
    stage = SFTStageIR(name="t", steps=3, lr=1e-3, loss=loss)
    module = SFTModule(loaded, stage, enc.role_names, grad_clip=1.0)
    trainer = build_trainer(3, objective=module.objective, accelerator="cpu", devices=2, strategy="ddp")
    trainer.fit(module, datamodule=SFTDataModule(task, enc, batch_size=4, seed=0, n_items=32))
    total = float(sum(p.detach().double().sum() for p in module.model.parameters()))
    print(f"RANK {trainer.global_rank} {trainer.global_step} {total:.10e} {module.lr_scale:.10e}")
""".replace("{rules!r}", repr(RULES))


def test_ngdiff_under_ddp_keeps_ranks_in_sync(tiny, tmp_path) -> None:
    """Two gloo processes on CPU: NGDiff's all-reduced group gradients and the auto-LR line
    search leave identical weights on both ranks."""
    import subprocess
    import sys

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tiny.path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # the ranks share one stdout pipe, so one rank's line can land inside the other's: match records, not lines
    lines = sorted(m.split()[1:] for m in re.findall(r"RANK \d+ \d+ \S+e[+-]\d+ \S+e[+-]\d+", out.stdout))
    assert len(lines) == 2, out.stderr[-2000:]
    assert lines[0][1:] == lines[1][1:] and lines[0][1] == "3"
