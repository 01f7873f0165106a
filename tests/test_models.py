"""Models and encoding: the embedded tiny VLM, real architectures from local tiny
checkpoints (Idefics3, Gemma3) with LoRA, loading errors, and target/role encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from percepdsl.ir import LoraIR
from percepdsl_runtime.encoding import Encoder, EncodingError, collate
from percepdsl_runtime.models import LoadedModel, ModelLoadError, build_tiny, check_vocabulary, load_hf, load_weights, save_pretrained_dir
from percepdsl_runtime.sft import role_losses

RULES = [
    {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>", "markers": True},
    {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>", "markers": True},
    {"role": "reasoning", "kind": "rest"},
]


# ------------------------------------------------------------------ tiny model
def test_tiny_default_size_and_reload(task, tmp_path) -> None:
    loaded = build_tiny(task.vocabulary(), image=task.params.image, save_dir=tmp_path)
    assert loaded.kind == "tiny" and loaded.path == tmp_path
    assert 2.8e6 < loaded.num_parameters() < 3.5e6  # ≈3M parameters at the defaults
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    again = load_hf(tmp_path)  # a reload is the same tiny model
    assert again.kind == "tiny"
    for (n, a), (_, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert "{% generation %}" in loaded.processor.chat_template
    assert check_vocabulary(loaded, task.vocabulary()) == []


def test_tiny_image_tokens_match_model(tiny, task) -> None:
    enc = Encoder(tiny, RULES)
    s = task.sample("train", 0)
    item = enc.encode_train(s.query, s.image, s.response)
    n_img = int((item["input_ids"] == tiny.model.config.image_token_index).sum())
    assert n_img == (64 // 16) ** 2
    batch = collate([item], enc.pad_token_id)
    sums, counts = role_losses(tiny.model, batch, len(enc.role_names))  # runs: counts agree
    assert int(counts.sum()) == item["n_target"]


def test_tiny_template_works_with_assistant_masks(tiny) -> None:
    """TRL's assistant-only loss relies on {% generation %}: the mask covers the response + <eos>."""
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "solve"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer> c1 </answer>"}]},
    ]
    out = tiny.processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = out["input_ids"][0] if isinstance(out["input_ids"][0], list) else out["input_ids"]
    mask = out["assistant_masks"][0] if isinstance(out["assistant_masks"][0], list) else out["assistant_masks"]
    target = [i for i, m in zip(ids, mask) if m]
    assert tiny.tokenizer.convert_ids_to_tokens(target) == ["<answer>", "c1", "</answer>", "<eos>"]


# ------------------------------------------------------------------ encoding
def test_encode_train_targets_and_roles(tiny, task) -> None:
    enc = Encoder(tiny, RULES)
    assert enc.role_names == ["perception", "answer", "reasoning"]
    s = task.sample("train", 3)
    item = enc.encode_train(s.query, s.image, s.response)
    labels, roles = item["labels"], item["role_ids"]
    target = labels != -100
    assert torch.equal(target, roles >= 0)  # exactly the targets have a role
    assert item["n_target"] == len(s.response.split()) + 1  # response words + <eos>
    assert enc.decode(labels[target]) == s.response
    assert labels[target][-1] == enc.eos_token_id
    words = tiny.tokenizer.convert_ids_to_tokens(labels[target].tolist())
    names = [enc.role_names[r] for r in roles[target].tolist()]
    p_end = words.index("</perception>")
    assert names[: p_end + 1] == ["perception"] * (p_end + 1)
    assert names[words.index("<answer>") :] == ["answer"] * (len(words) - words.index("<answer>"))
    assert set(names[p_end + 1 : words.index("<answer>")]) == {"reasoning"}
    # prompt + image tokens are never targets
    assert not target[: int((item["input_ids"] == tiny.model.config.image_token_index).nonzero().max()) + 1].any()


def test_encode_prompt_prefix_and_collate(tiny, task) -> None:
    enc = Encoder(tiny, RULES)
    s = task.sample("test", 0)
    prefix = f"<perception> {s.perception} </perception> <reasoning>"
    p = enc.encode_prompt(s.query, s.image, prefix=prefix)
    full = enc.encode_train(s.query, s.image, s.response)
    n = p["input_ids"].shape[0]
    assert torch.equal(full["input_ids"][:n], p["input_ids"])  # prompt + prefix is a prefix of training
    bare = enc.encode_prompt(s.query, s.image)
    batch = collate([p, bare], enc.pad_token_id)  # prompts: left-padded
    assert batch["input_ids"].shape == (2, n) and batch["pixel_values"].shape[0] == 2
    assert batch["attention_mask"][1, 0] == 0 and batch["input_ids"][1, 0] == enc.pad_token_id
    assert batch["attention_mask"][1, -1] == 1
    train = collate([full, enc.encode_train(s.query, s.image, "<answer> c1 </answer>")], enc.pad_token_id)
    assert train["labels"][1, -1] == -100 and train["role_ids"][1, -1] == -1  # right-padded
    assert train["input_ids"][1, -1] == enc.pad_token_id


def test_max_length_truncates(tiny, task) -> None:
    enc = Encoder(tiny, RULES, max_length=30)
    s = task.sample("train", 0)
    item = enc.encode_train(s.query, s.image, s.response)
    assert item["input_ids"].shape[0] == 30 and item["labels"].shape[0] == 30
    assert item["n_target"] == int((item["labels"] != -100).sum())


# ------------------------------------------------------------------ loading errors
def test_load_errors(tmp_path, tiny, task) -> None:
    with pytest.raises(ModelLoadError, match="does not exist$"):
        load_hf(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"does not exist \(a relative model path is relative to the current directory"):
        load_hf("nope/not/here")  # not a hub id either (three parts)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    ).save_pretrained(text_only)
    with pytest.raises(ModelLoadError, match="not an image-text-to-text checkpoint"):
        load_hf(text_only)
    with pytest.raises(ModelLoadError, match="cannot encode"):
        load_hf(tiny.path, vocab=task.vocabulary() + ["never-seen-word"])
    assert check_vocabulary(tiny, ["c1", "zebra"]) == ["zebra"]
    adapter = save_pretrained_dir(load_hf(tiny.path, lora=LoraIR(r=4, alpha=8)), tmp_path / "adapter")
    with pytest.raises(
        ModelLoadError, match=rf"is a PEFT adapter \(adapter_config.json, over the base '{tiny.path}'\), not a full checkpoint"
    ):
        load_hf(adapter)  # a LoRA run's stage directory
    with pytest.raises(ModelLoadError, match=r"LoRA: target module\(s\) `v_prj` match no module of .*named .*v_proj"):
        load_hf(tiny.path, lora=LoraIR(target_modules=["q_proj", "v_prj"]))  # PEFT adapted q_proj alone, silently
    with pytest.raises(ValidationError, match="rank"):  # LoRA settings are typed: a wrong name cannot reach the loader
        LoraIR(rank=4)


# ------------------------------------------------------------------ real architectures
def _bpe(specials: list[str], corpus: list[str]):
    """A byte-level BPE tokenizer (subword pieces) trained on task text in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def _corpus(task) -> list[str]:
    return [task.sample("train", i).response for i in range(20)] + [task.sample("train", 0).query, "User Assistant model"]


def make_idefics3(path: Path, task) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(specials, _corpus(task)), bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>"
    )
    template = (  # SmolVLM / Idefics3's own template
        "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, max_image_size={"longest_edge": 32}, size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
    proc.save_pretrained(path)
    ids = {s: proc.tokenizer.convert_tokens_to_ids(s) for s in specials}
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(
            model_type="llama",
            vocab_size=len(proc.tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<end_of_utterance>"],
        ),
        image_token_id=ids["<image>"],
        scale_factor=2,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(path)
    return path


def make_gemma3(path: Path, task) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(specials, _corpus(task)),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    template = (  # Gemma 3's template, reduced to what the tests use
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
        "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok, image_seq_length=4, chat_template=template
    )
    proc.save_pretrained(path)
    ids = {s: proc.tokenizer.convert_tokens_to_ids(s) for s in specials}
    cfg = Gemma3Config(
        text_config=dict(
            vocab_size=len(proc.tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=64,
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("make", [make_idefics3, make_gemma3], ids=["idefics3", "gemma3"])
def test_real_architecture_with_lora(make, task, tmp_path) -> None:
    path = make(tmp_path / "ckpt", task)
    loaded = load_hf(path, lora=LoraIR(r=4, alpha=8, dropout=0.0), vocab=task.vocabulary())
    assert loaded.kind == "hf" and hasattr(loaded.model, "peft_config")
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert loaded.num_parameters(trainable_only=True) < 0.2 * loaded.num_parameters()

    enc = Encoder(loaded, RULES)
    samples = [task.sample("train", i) for i in range(2)]
    items = [enc.encode_train(s.query, s.image, s.response) for s in samples]
    for s, item in zip(samples, items):
        target = item["labels"] != -100
        assert torch.equal(target, item["role_ids"] >= 0)
        text = loaded.tokenizer.decode(item["labels"][target], skip_special_tokens=False)
        assert text.strip() == enc.target_text(s.response).strip()  # subword pieces re-join exactly
        pieces = loaded.tokenizer.convert_ids_to_tokens(item["labels"][target].tolist())
        assert len(pieces) > len(s.response.split())  # really subwords
        n_p = len(loaded.tokenizer(" " + s.response.split("</perception>")[0] + "</perception>", add_special_tokens=False)["input_ids"])
        roles = item["role_ids"][target].tolist()
        assert abs(roles.count(0) - n_p) <= 1  # perception tokens ≈ pieces of the perception section

    # the counterfactual prompt is the training item's own tokens up to p*'s end, the model's extras
    # (Gemma 3's token types, the expanded image) included, and the prefix alone tokenizes the same here
    for s, item in zip(samples, items):
        prefix = task.counterfactual_prefix(s)
        cf = enc.encode_prompt(s.query, s.image, prefix, response=s.response)
        n, T = cf["input_ids"].shape[0], item["input_ids"].shape[0]
        assert n < T and set(cf) <= set(item)
        for key, v in cf.items():
            assert torch.equal(v, item[key][:n] if item[key].dim() == 1 and item[key].shape[0] == T else item[key]), key
        assert enc.encode_prompt(s.query, s.image, prefix)["input_ids"].tolist() == cf["input_ids"].tolist()

    batch = collate(items, enc.pad_token_id)
    loaded.model.train()
    sums, counts = role_losses(loaded.model, batch, len(enc.role_names))
    assert int(counts.sum()) == sum(it["n_target"] for it in items)
    (sums.sum() / counts.sum()).backward()
    lora_b = [p for n, p in loaded.model.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)

    loaded.model.eval()
    prompts = collate([enc.encode_prompt(s.query, s.image) for s in samples], enc.pad_token_id)
    out = loaded.model.generate(**prompts, max_new_tokens=3, do_sample=False, eos_token_id=enc.eos_token_id, pad_token_id=enc.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= prompts["input_ids"].shape[1] + 3


def test_checkpoint_without_weights_is_reported(tmp_path) -> None:
    """A config without weights or processor files gives a ModelLoadError, not a traceback."""
    from transformers import LlavaConfig

    path = tmp_path / "broken"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            LlavaConfig(
                vision_config={
                    "model_type": "clip_vision_model",
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "image_size": 32,
                    "patch_size": 16,
                },
                text_config={
                    "model_type": "llama",
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "vocab_size": 40,
                },
            ).to_dict()
        )
    )
    with pytest.raises(ModelLoadError):
        load_hf(path)  # no weights, no processor files


def test_a_truncated_weights_file_is_reported_with_its_checkpoint(tiny, tmp_path) -> None:
    """A model.safetensors cut short (an interrupted copy) names the checkpoint, not only safetensors' error."""
    import shutil

    path = tmp_path / "cut"
    shutil.copytree(tiny.path, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=rf"cannot load the model in {str(path)!r}: SafetensorError"):
        load_hf(path)


@pytest.mark.parametrize(
    "template, error",
    [
        (lambda t: t.replace("<image>", ""), r"the processor cannot encode an item .*0 <image> tokens and 1 images"),
        (lambda t: "{{ raise_exception('roles must alternate') }}", r"the chat template cannot render .*roles must alternate"),
    ],
    ids=["no-image-token", "template-raises"],
)
def test_a_chat_template_that_cannot_serve_is_an_encoding_error(tiny, task, tmp_path, template, error) -> None:
    """A chat template that writes no image placeholder (the processor then refuses the image) or
    that raises: EncodingError, which a run reports as a refusal, not a ValueError or TemplateError traceback."""
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny.path, path)
    (path / "chat_template.jinja").write_text(template((path / "chat_template.jinja").read_text()))
    loaded = load_hf(path)
    s = task.sample("train", 0)
    with pytest.raises(EncodingError, match=error):
        Encoder(loaded, RULES).encode_train(s.query, s.image, s.response)


@pytest.mark.parametrize(
    "remove, says",
    [
        (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer files"),
        (("processor_config.json",), "has no processor or image-processor config"),
    ],
    ids=["no-tokenizer", "no-processor"],
)
def test_a_checkpoint_without_processor_files_says_which(tiny, tmp_path, remove, says) -> None:
    """Without its tokenizer files transformers talks of sentencepiece and tiktoken; the message says what is missing."""
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny.path, path)
    for name in remove:
        (path / name).unlink()
    with pytest.raises(ModelLoadError, match=rf"cannot load the processor of {str(path)!r}: .*{says}"):
        load_hf(path)


def test_a_chat_template_kept_by_the_tokenizer_alone_serves(tiny, task, tmp_path) -> None:
    """Older checkpoints keep the chat template in tokenizer_config.json only; the processor then has
    none and was refused ("has no chat template") though the checkpoint has one. It is used, and
    encodes as the processor's own did."""
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny.path, path)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    loaded = load_hf(path)
    assert loaded.processor.chat_template == template
    s = task.sample("train", 0)
    got, want = (Encoder(m, RULES).encode_train(s.query, s.image, s.response) for m in (loaded, tiny))
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def test_text_only_items_encode(tiny, task) -> None:
    enc = Encoder(tiny, RULES)
    item = enc.encode_train("solve", None, "<answer> c1 </answer>")
    assert "pixel_values" not in item and item["n_target"] == 4
    assert int((item["input_ids"] == tiny.model.config.image_token_index).sum()) == 0


# ------------------------------------------------------------------ standard artefacts
def _logits(model, processor, task) -> torch.Tensor:
    enc = Encoder(LoadedModel(model=model, processor=processor, kind="hf", path=None), RULES)
    s = task.sample("test", 1)
    batch = collate([enc.encode_train(s.query, s.image, s.response)], enc.pad_token_id)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k not in ("labels", "role_ids", "n_target")}).logits.float()


def test_saved_model_loads_with_transformers_and_gives_the_same_logits(tiny, task, tmp_path) -> None:
    """A full model's directory (save_pretrained of the model and the processor) loads with
    AutoModelForImageTextToText + AutoProcessor and computes the in-memory model's logits; its
    weights put back into a loaded model (stage chaining) are the saved ones."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = load_hf(tiny.path)
    with torch.no_grad():  # weights no fresh build has: as if trained
        for p in loaded.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loaded.model.eval()
    path = save_pretrained_dir(loaded, tmp_path / "stage" / "model")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    want = _logits(loaded.model, loaded.processor, task)
    assert torch.allclose(_logits(model, processor, task), want, atol=1e-5)

    fresh = load_hf(tiny.path)
    load_weights(fresh, path)
    for (n, a), (_, b) in zip(loaded.model.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert load_hf(path).kind == "tiny"  # the marker went along: the tiny model's attention again


def test_saved_lora_adapter_loads_with_peft_and_gives_the_same_logits(tiny, task, tmp_path) -> None:
    """A LoRA model's directory is PEFT's own adapter (adapter_config.json + adapter weights, no
    base weights): PeftModel.from_pretrained over the base checkpoint gives the in-memory logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    lora = LoraIR(r=2, alpha=4.0, dropout=0.0)
    loaded = load_hf(tiny.path, lora=lora)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    loaded.model.eval()
    path = save_pretrained_dir(loaded, tmp_path / "model")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny.path) and config["r"] == 2
    assert (path / "adapter_model.safetensors").stat().st_size < (tiny.path / "model.safetensors").stat().st_size / 5
    assert not (path / "model.safetensors").exists()
    base = AutoModelForImageTextToText.from_pretrained(tiny.path, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, path).eval()
    want = _logits(loaded.model, loaded.processor, task)
    assert torch.allclose(_logits(model, AutoProcessor.from_pretrained(path), task), want, atol=1e-5)
    with model.disable_adapter():  # the adapter matters
        assert not torch.allclose(_logits(model, loaded.processor, task), want, atol=1e-3)

    fresh = load_hf(tiny.path, lora=lora)
    load_weights(fresh, path)
    for (n, a), (_, b) in zip(loaded.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(a, b), n
