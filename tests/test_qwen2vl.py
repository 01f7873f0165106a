"""Qwen2-VL and Qwen2.5-VL: flattened image patches in GRPO's log-prob forward.

These models take ``pixel_values [Σ patches, D]`` (each image's ``t·h·w`` patches as
consecutive rows) with ``image_grid_thw [images, 3]``, and ``mm_token_type_ids`` marking the
image tokens. Tiny random models are built from their configs; their inputs are laid out by
hand the way the processor lays them out, because transformers cannot build the processor
without torchvision (its video processor), and the only torchvision on the package mirror is
the CUDA build, which does not import against the CPU torch here (see docs/training.md)."""

from __future__ import annotations

import pytest
import torch

from percepdsl_runtime.encoding import collate
from percepdsl_runtime.grpo import completion_logprobs, prompt_rows
from percepdsl_runtime.sampling import Rollouts

VISION_START, VISION_END, IMAGE, VIDEO, PAD, EOS = 3, 4, 5, 6, 0, 1
PATCH, MERGE, TEMPORAL = 8, 2, 2


def tiny_qwen(kind: str):
    import transformers

    text = dict(
        vocab_size=48,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},  # head dim 16: 2·(2+2+4)
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
    )
    vision = dict(depth=1, hidden_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    if kind == "qwen2_vl":
        config, model = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision |= dict(embed_dim=32, mlp_ratio=2)
    else:
        config, model = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision |= dict(intermediate_size=64, out_hidden_size=64, window_size=32, fullatt_block_indexes=[0])
    cfg = config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    return model(cfg).eval()


def prompt_item(h: int, w: int, text: list[int], seed: int) -> dict[str, torch.Tensor]:
    """One encoded prompt as the Qwen2-VL processor makes it: an image of h×w patches (one
    temporal step) becomes h·w/merge² image tokens between the vision markers."""
    g = torch.Generator().manual_seed(seed)
    n_tokens = h * w // MERGE**2
    ids = torch.tensor([2, VISION_START] + [IMAGE] * n_tokens + [VISION_END] + text)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == IMAGE).long(),
        "pixel_values": torch.randn(h * w, 3 * TEMPORAL * PATCH * PATCH, generator=g),
        "image_grid_thw": torch.tensor([[1, h, w]]),
    }


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_group_logprobs_equal_one_row_at_a_time(kind: str) -> None:
    """Two prompts whose images have different patch counts (4×4 and 4×6), three sampled
    completions each: the log-probs of every row from one batched forward over the group's
    rows equal those of a forward over that row's own prompt alone (no padding, no other image)."""
    model = tiny_qwen(kind)
    items = [prompt_item(4, 4, [7, 8, 9, 10, 11], seed=1), prompt_item(4, 6, [12, 13], seed=2)]
    prompt = collate(items, PAD)  # left-padded; patches concatenated: [16 + 24, D]
    assert prompt["pixel_values"].shape[0] == 40 and prompt["attention_mask"][0].all() and not prompt["attention_mask"][1].all()
    G, T = 3, 5
    completions = torch.randint(7, 48, (len(items) * G, T), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(completions)
    mask[4, 3:] = 0  # a row that stopped early
    roll = Rollouts(prompt=prompt, ids=completions, mask=mask, truncated=torch.zeros(6, dtype=torch.bool), group=G)
    with torch.no_grad():
        group = completion_logprobs(model, roll, temperature=0.7)
        subset = completion_logprobs(model, roll, temperature=0.7, rows=torch.tensor([5, 1]))
        for row in range(len(items) * G):
            alone = Rollouts(
                prompt=collate([items[row // G]], PAD),
                ids=completions[row : row + 1],
                mask=mask[row : row + 1],
                truncated=torch.zeros(1, dtype=torch.bool),
                group=1,
            )
            want = completion_logprobs(model, alone, temperature=0.7)[0]
            keep = mask[row].bool()
            assert torch.allclose(group[row][keep], want[keep], atol=1e-5), (row, (group[row] - want).abs().max())
    assert torch.allclose(subset, group[[5, 1]], atol=1e-6)


def test_prompt_rows_repeat_each_images_patch_block() -> None:
    items = [prompt_item(4, 4, [7], seed=1), prompt_item(2, 4, [8], seed=2)]
    prompt = collate(items, PAD)
    rows = prompt_rows(prompt, torch.tensor([1, 1, 0]))
    assert torch.equal(rows["image_grid_thw"], torch.tensor([[1, 2, 4], [1, 2, 4], [1, 4, 4]]))
    want = torch.cat([items[1]["pixel_values"], items[1]["pixel_values"], items[0]["pixel_values"]])
    assert torch.equal(rows["pixel_values"], want)
    assert torch.equal(rows["input_ids"], prompt["input_ids"][[1, 1, 0]])
    with pytest.raises(ValueError, match="one image per prompt"):
        prompt_rows({**prompt, "image_grid_thw": prompt["image_grid_thw"][:1]}, torch.tensor([0]))
