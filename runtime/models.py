"""Models: the embedded tiny VLM and any local Hugging Face image-text-to-text checkpoint.

``build_tiny`` makes a LLaVA-style model (small CLIP vision tower + small Llama) with
random weights and a word-level tokenizer over the task vocabulary, saves it in Hugging
Face format and loads it back through ``load_hf`` — so the tiny default exercises the
same loading path as a real checkpoint. ``load_hf`` loads any local
checkpoint with ``AutoModelForImageTextToText`` + ``AutoProcessor``, optionally wrapping
it in a PEFT LoRA adapter.

A run builds its model through the catalogue's ``impl`` of the model kind, called as
``impl(model: ModelIR, *, vocabulary, image, seed, save_dir) -> LoadedModel``: ``tiny_model``
and ``hf_model`` here, or a plugin's function with the same signature.

``model hf`` takes a local path or a Hugging Face hub id (``org/name``), which is resolved
through the local Hugging Face cache (``resolve_checkpoint``). A run's weights are written
as standard Hugging Face directories (``save_pretrained_dir``): the model's and the
processor's ``save_pretrained`` — for a PEFT model, PEFT's own adapter files — so
``AutoModelForImageTextToText``/``AutoProcessor`` or ``PeftModel.from_pretrained`` load
them; ``load_weights`` puts such a directory's weights back into a loaded model (stage
chaining, resume).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from percepdsl.catalogue import MODEL_PARTS, default
from percepdsl.io import atomic_dir
from percepdsl.ir import LoraIR, ModelIR, TinyParams

# Special tokens of the tiny word-level tokenizer; <image> is expanded by the processor
# into one token per image patch.
TINY_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")

# Chat template of the tiny processor. Everything it renders is space-separated words, so
# the word-level tokenizer sees exactly the vocabulary. The {% generation %} markers let
# TRL's assistant-only loss find the response; the end-of-turn <eos> is inside them so a
# model learns to stop. There is no assistant header: responses start with a marker.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<bos>"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %} {% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} <eos>{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)


# A tiny checkpoint carries this file (its build parameters); load_hf then reports kind
# "tiny" and uses TINY_ATTENTION. Eager attention: at these sizes (T ≈ 50-300, head dim 64)
# a bf16 training step is ≈1.4× faster than with SDPA, whose CPU flash-attention backward
# dominates the step (measured with benchmarks/bench_sft.py's setup, 1 thread).
TINY_MARKER = "percep_tiny.json"
TINY_ATTENTION = "eager"


class ModelLoadError(Exception):
    """A model could not be loaded or cannot serve the task; the message says why."""


class ModelPartError(ModelLoadError):
    """A stage's `freeze` names a part this model's architecture has no module for (``part_parameters``)."""


@dataclass
class LoadedModel:
    """A model ready for training/generation, with the processor that feeds it."""

    model: Any  # transformers PreTrainedModel, possibly PEFT-wrapped
    processor: Any  # transformers ProcessorMixin (tokenizer + image processor + chat template)
    kind: str  # "tiny" | "hf"
    path: Path | None
    # the names of the parameters that train as loaded (with LoRA: the adapters'), what a stage that
    # freezes nothing trains (`freeze`); taken when the model is wrapped, before any stage froze a part
    trainable_as_loaded: frozenset[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.trainable_as_loaded is None and self.model is not None:
            self.trainable_as_loaded = frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)


# Where a part's modules are when transformers has no accessor for it (or an older release lacks one):
# attribute paths under the model and under its `.model` (transformers ≥ 5 keeps them there), tried in
# order. `visual.merger` is Qwen2-VL's and Qwen2.5-VL's projector, inside their vision module.
PART_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "vision": ("vision_tower", "visual", "vision_model", "vision_encoder", "image_tower"),
    "projector": ("multi_modal_projector", "connector", "visual.merger", "mm_projector"),
    "language": ("language_model", "text_model"),
}


def _attribute(root: Any, path: str) -> torch.nn.Module | None:
    for name in path.split("."):
        root = getattr(root, name, None)
    return root if isinstance(root, torch.nn.Module) else None


def _part_modules(base: Any, part: str) -> list[torch.nn.Module]:
    """The modules of one part of a transformers model (not PEFT-wrapped), [] when it has none this
    function knows. transformers' own accessors first: ``get_encoder(modality="image")`` for the
    vision encoder (transformers ≥ 5), ``get_decoder()`` with the input and output embeddings for
    the language model; then the attribute table ``PART_ATTRIBUTES``. An accessor's answer that is
    the whole model (``get_encoder``'s way of saying none: the model or its ``.model``), or a decoder
    that holds the vision encoder, is passed over."""

    def own(m: Any) -> bool:
        return isinstance(m, torch.nn.Module) and m is not base

    found: list[torch.nn.Module] = []
    if part == "vision":
        try:
            encoder = base.get_encoder(modality="image")
        except (AttributeError, TypeError, ValueError):  # no accessor, or one without `modality` (transformers 4)
            encoder = None
        if own(encoder) and encoder is not getattr(base, "model", None):
            found.append(encoder)
    elif part == "language":
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        vision = {id(m) for m in _part_modules(base, "vision")}
        if own(decoder) and not any(id(m) in vision for m in decoder.modules()):
            found += [decoder, *(m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if own(m))]
    if not found:
        for root in (base, getattr(base, "model", None)):
            for path in PART_ATTRIBUTES[part]:
                m = _attribute(root, path) if root is not None else None
                if own(m):
                    found.append(m)
                    break
            if found:
                break
        if part == "language" and found:  # the output head sits beside the language model
            head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else getattr(base, "lm_head", None)
            if own(head):
                found.append(head)
    return found


def part_parameters(model: Any, part: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of one part of a vision-language model (``MODEL_PARTS``: `vision`, the vision
    encoder; `projector`, the multimodal projector or connector; `language`, the language model with
    its embeddings and output head), by their names in ``model.named_parameters()``. The one place
    parts are mapped to modules, for every architecture (``_part_modules``); a PEFT model's are its
    base model's, LoRA adapters included (they sit inside the modules they adapt). A projector inside
    the vision module (Qwen2-VL's merger) is the projector's, not the vision encoder's.
    ``ModelPartError`` when the architecture has no module for the part."""
    if part not in MODEL_PARTS:
        raise ValueError(f"unknown model part {part!r}; the parts are {', '.join(MODEL_PARTS)}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = _part_modules(base, part)
    if not modules:
        top = [n for n, _ in base.named_children()]
        inner = [f"model.{n}" for n, _ in getattr(base, "model", torch.nn.Module()).named_children()]
        raise ModelPartError(
            f"{type(base).__name__} has no {part} module this runtime can find (it looked for "
            f"{', '.join(f'`{a}`' for a in PART_ATTRIBUTES[part])} and transformers' accessors); its modules are "
            f"{', '.join(top + inner)}. Leave `{part}` out of `freeze`, or add the attribute to PART_ATTRIBUTES in runtime/models.py"
        )
    ids = {id(p) for m in modules for p in m.parameters()}
    if part == "vision":  # a projector nested in the vision module is the projector
        ids -= {id(p) for m in _part_modules(base, "projector") for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def freeze_parts(loaded: LoadedModel, parts: Sequence[str]) -> int:
    """Keep ``parts`` of ``loaded``'s model fixed for a stage (``requires_grad = False`` on their
    parameters, ``part_parameters``) and let every other parameter train as it did when loaded, so a
    part a parent stage froze trains again in a child that does not freeze it (the stages of a run
    share one model object); with LoRA, only the adapters outside the frozen parts train. Called when
    a stage's module is built, before its optimiser (which takes the trainable parameters only) and
    before a resume checkpoint is loaded (which leaves frozen parameters out: ``drop_frozen``).
    Returns the number of trainable parameters."""
    frozen = {id(p) for part in parts for p in part_parameters(loaded.model, part).values()}
    trainable = loaded.trainable_as_loaded
    for name, p in loaded.model.named_parameters():
        p.requires_grad_((trainable is None or name in trainable) and id(p) not in frozen)
    return loaded.num_parameters(trainable_only=True)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def tiny_model(model: ModelIR, *, vocabulary: Sequence[str], image: int, seed: int, save_dir: Path) -> LoadedModel:
    """The catalogue's `tiny` model kind (see the module doc for the signature)."""
    return build_tiny(vocabulary, image=image, seed=seed, save_dir=save_dir, **model.params.model_dump())


def hf_model(model: ModelIR, *, vocabulary: Sequence[str], image: int, seed: int, save_dir: Path) -> LoadedModel:
    """The catalogue's `hf` model kind: the checkpoint at ``model.path`` (a local path or a hub
    id in the local Hugging Face cache), with ``model.lora``."""
    return load_hf(model.path, lora=model.lora, dtype=model.params.dtype)


def resolve_checkpoint(ref: str | Path) -> Path:
    """The local directory of a checkpoint named by a path or a Hugging Face hub id.

    An existing path is itself. Otherwise a valid hub id (``org/name``) is looked up in the
    local Hugging Face cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``); if it is not there
    and ``HF_HUB_OFFLINE`` is not set, it is downloaded into the cache. ``ModelLoadError``
    when neither works, naming the id, the cache and ``HF_HUB_OFFLINE``; a name that is no
    hub id either is reported as a missing path."""
    path = Path(ref).expanduser()
    if path.exists() or not _is_hub_id(str(ref)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(ref), local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = f"no local path {str(ref)!r} and no copy of the hub model `{ref}` in the Hugging Face cache {constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"{where}, and HF_HUB_OFFLINE is set, so it is not downloaded: download it into that cache where there is a "
            f"network (`hf download {ref}`; HF_HOME or HF_HUB_CACHE choose the cache), or give the checkpoint's local path"
        )
    try:
        return Path(snapshot_download(str(ref)))
    except Exception as exc:  # noqa: BLE001 - no network, unknown or gated repository: one refusal
        raise ModelLoadError(
            f"{where}, and downloading it failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); without a network, "
            f"download it into that cache elsewhere (`hf download {ref}`) or give a local path; HF_HUB_OFFLINE=1 skips the download"
        ) from exc


def _is_hub_id(ref: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def build_tiny(
    vocab: Sequence[str],
    *,
    image: int,
    seed: int = 0,
    save_dir: Path | None = None,
    **sizes: int,
) -> LoadedModel:
    """Build the embedded tiny LLaVA (≈3M parameters at the defaults), save it, reload it.

    ``vocab`` is the task vocabulary (space-separated words of queries and responses);
    ``image`` the task's image side; ``sizes`` some of ``percepdsl.ir.TinyParams``
    (``width``, ``depth``, ``heads``, ``vision_width``, ``vision_depth``, ``patch``; the rest
    are the catalogue's defaults). The model is written to ``save_dir`` (a fresh temporary
    directory if None; an existing one is replaced whole, atomically) and loaded back with
    ``load_hf``, so what trains is exactly what a later run reloads.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    p = TinyParams(**sizes)
    width, depth, heads, vision_width, vision_depth, patch = p.width, p.depth, p.heads, p.vision_width, p.vision_depth, p.patch
    if image % patch:
        raise ValueError(f"image size {image} must be a multiple of the patch size {patch}")
    words = list(TINY_SPECIALS) + [w for w in dict.fromkeys(vocab) if w not in TINY_SPECIALS]
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"vocabulary words must be non-empty and contain no whitespace: {bad[:5]}")
    ids = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no decoder: the tokenizers library then joins decoded words with single spaces
    tok.add_special_tokens(list(TINY_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        clean_up_tokenization_spaces=False,  # "1 2 , 3" must not become "1 2, 3"
        model_max_length=4096,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token; "default" drops it again → (image/patch)² tokens
        chat_template=TINY_CHAT_TEMPLATE,
    )
    n_image_tokens = (image // patch) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_width,
            intermediate_size=4 * vision_width,
            num_hidden_layers=vision_depth,
            num_attention_heads=heads,
            image_size=image,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,  # 2× (not Llama's 8/3×): 3.05M parameters at the defaults
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=len(words),
            max_position_embeddings=4096,
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
            pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"],
        image_seq_length=n_image_tokens,
        vision_feature_select_strategy="default",
        # The projector reads the layer-normed patch embeddings (layer 0) beside the last layer, and has
        # no bias. With LLaVA's usual single unnormalised layer and biased projector, training from
        # scratch drove the image tokens to a near-constant vector (features varied ≈5% across images
        # after 1,200 steps) and perception never left the prior, even with a perception-only loss at
        # patch 16; with both changes, a token-mean loss reads the graph (perception-token accuracy
        # 0.79 → 0.99 in 600 steps; either change alone stayed at 0.79). Both are stock LlavaConfig options.
        vision_feature_layer=[0, -1],
        multimodal_projector_bias=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["<eos>"]
    if save_dir is None:
        save_dir = Path(tempfile.mkdtemp(prefix="percep-tiny-"))
    build = dict(
        width=width,
        depth=depth,
        heads=heads,
        vision_width=vision_width,
        vision_depth=vision_depth,
        patch=patch,
        image=image,
        seed=seed,
        attn_implementation=TINY_ATTENTION,
    )
    with atomic_dir(save_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / TINY_MARKER).write_text(json.dumps(build, indent=2))
    return load_hf(save_dir)


def load_hf(
    path: str | Path,
    *,
    lora: LoraIR | None = None,
    dtype: str = default("model", "hf", "dtype"),
    vocab: Sequence[str] | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load an image-text-to-text checkpoint (+ optional LoRA) from a local path or a hub id in
    the local Hugging Face cache (``resolve_checkpoint``).

    ``lora``: the typed LoRA settings (``LoraIR``, the catalogue's defaults: ``target_modules
    = "all-linear"`` is every linear layer but the output head, vision tower included —
    perception is what the study trains, so the vision side must be able to move).
    ``vocab``: if given, raise ``ModelLoadError`` when the tokenizer cannot encode a word.
    ``attn_implementation``: passed to transformers (default: its choice; eager for tiny).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    ref = str(path)
    path = resolve_checkpoint(path)
    if not path.exists():
        # include and dataset paths are relative to the spec; a model path is not (it is also a hub id)
        where = "" if path.is_absolute() else f" (a relative model path is relative to the current directory, {Path.cwd()})"
        raise ModelLoadError(f"model path {str(path)!r} does not exist{where}")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():  # a LoRA stage's model directory
            try:
                base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                base = None
            raise ModelLoadError(
                f"{str(path)!r} is a PEFT adapter (adapter_config.json, over the base {base!r}), not a full checkpoint; "
                "`model hf` loads full checkpoints: merge the adapter into its base and save that "
                "(PeftModel.from_pretrained(base, path).merge_and_unload().save_pretrained(...), with the processor), or train from the base"
            )
        raise ModelLoadError(f"{str(path)!r} is not a Hugging Face checkpoint (no config.json)")
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - report any config failure the same way
        raise ModelLoadError(f"cannot read the config of {str(path)!r}: {exc}") from exc
    tiny = (path / TINY_MARKER).is_file()
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if attn_implementation or tiny:
        kwargs["attn_implementation"] = attn_implementation or TINY_ATTENTION
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            archs = getattr(config, "architectures", None)
            raise ModelLoadError(
                f"{str(path)!r} is not an image-text-to-text checkpoint "
                f"(config {type(config).__name__}, architectures {archs}); expected a vision-language model"
            ) from exc
        raise ModelLoadError(f"cannot load the model in {str(path)!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - damaged weights fail in transformers, safetensors or torch alike
        raise ModelLoadError(f"cannot load the model in {str(path)!r}: {type(exc).__name__}: {str(exc)[:300].rstrip('.')}") from exc
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load the processor of {str(path)!r}: {_missing_processor_files(path)}{type(exc).__name__}: {exc} "
            "(some processors need optional packages, e.g. Qwen2-VL's video processor needs torchvision)"
        ) from exc
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise ModelLoadError(
            f"{str(path)!r} has a {type(processor).__name__}, not a multimodal processor with a tokenizer and an image processor"
        )
    if not getattr(processor, "chat_template", None) and isinstance(getattr(processor.tokenizer, "chat_template", None), str):
        processor.chat_template = processor.tokenizer.chat_template  # older checkpoints keep it in tokenizer_config.json only
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(f"the processor of {str(path)!r} has no chat template; training sequences are built with it")
    if ref != str(path):  # a hub id: saved configs and adapters name it, not this machine's cache path
        model.name_or_path = ref
    if lora:
        model = _with_lora(model, lora)
    loaded = LoadedModel(model=model, processor=processor, kind="tiny" if tiny else "hf", path=path)
    if vocab is not None:
        missing = check_vocabulary(loaded, vocab)
        if missing:
            raise ModelLoadError(f"the tokenizer of {str(path)!r} cannot encode {len(missing)} task word(s), e.g. {missing[:8]}")
    return loaded


def _missing_processor_files(path: Path) -> str:
    """What a checkpoint directory lacks that ``AutoProcessor`` reads (transformers' own message for a
    missing tokenizer speaks of sentencepiece and tiktoken), as the start of a refusal; '' if it has both."""
    missing = []
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")):
        missing.append("it has no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model)")
    if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json", "image_processor_config.json")):
        missing.append("it has no processor or image-processor config (processor_config.json, preprocessor_config.json)")
    return "".join(f"{m}; " for m in missing)


def save_pretrained_dir(loaded: LoadedModel, path: str | Path) -> Path:
    """Write ``loaded`` as a Hugging Face directory, atomically (``atomic_dir``: a kill leaves
    the old directory or the new one, never part of one): the model's ``save_pretrained`` —
    for a PEFT model PEFT's own, which writes the adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) and not the base — and the processor's (tokenizer, image
    processor, chat template). A tiny model's marker goes along, so ``load_hf`` of the
    directory is the tiny model again (eager attention). Load the result with
    ``AutoModelForImageTextToText``/``AutoProcessor``, ``PeftModel.from_pretrained(base, path)``,
    ``load_hf`` or, into a loaded model, ``load_weights``."""
    path = Path(path)
    with atomic_dir(path) as staging, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about the base model's config
        loaded.model.save_pretrained(staging)
        loaded.processor.save_pretrained(staging)
        if loaded.path is not None and (Path(loaded.path) / TINY_MARKER).is_file():
            shutil.copyfile(Path(loaded.path) / TINY_MARKER, staging / TINY_MARKER)
    return path


def load_weights(loaded: LoadedModel, path: str | Path) -> None:
    """Put the weights of a ``save_pretrained_dir`` directory into ``loaded.model`` in place.

    A PEFT model takes the adapter through PEFT's ``set_peft_model_state_dict`` (every saved
    tensor must land); a full model loads the directory with transformers, which maps the
    saved names (transformers writes some architectures, LLaVA among them, under their older
    key names) and ties weights, and copies its state over."""
    from safetensors.torch import load_file

    path = Path(path)
    model = loaded.model
    try:
        if hasattr(model, "peft_config"):
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
            if result.unexpected_keys:
                raise ModelLoadError(f"{path}: adapter tensors not in the model: {sorted(result.unexpected_keys)[:5]}")
            return
        from transformers import AutoModelForImageTextToText

        dtype = next(model.parameters()).dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        model.load_state_dict(saved.state_dict())
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged directory fails in transformers, safetensors or torch alike
        raise ModelLoadError(f"cannot load the weights saved in {path}: {type(exc).__name__}: {str(exc)[:300].rstrip('.')}") from exc


def drop_frozen(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Leave a module's frozen parameters out of a Lightning checkpoint's ``state_dict`` (its
    ``on_save_checkpoint``): a stage never changes them, and the runner loads them from the parent
    stage before it resumes. With LoRA that is the whole base model: gigabytes of a real
    checkpoint, written every ``RESUME_EVERY`` steps. ``restore_frozen`` puts them back on load."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if frozen and "state_dict" in checkpoint:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}


def restore_frozen(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """The module's own frozen parameters for those a checkpoint left out (``drop_frozen``; its
    ``on_load_checkpoint``, before Lightning's strict load of the ``state_dict``)."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    for name, param in module.named_parameters(remove_duplicate=False):
        if not param.requires_grad and name not in state:
            state[name] = param.detach()


def _with_lora(model: Any, lora: LoraIR) -> Any:
    from peft import LoraConfig, get_peft_model

    if isinstance(lora.target_modules, list):
        # PEFT refuses a list only when no name matches; one typo beside a real name was silently not adapted
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, torch.nn.Linear)})
            raise ModelLoadError(
                f"LoRA: target module(s) {', '.join(f'`{t}`' for t in unmatched)} match no module of "
                f"{type(model).__name__} (a name matches a module's full name or its last parts); its linear layers are named {leaves[:30]}"
            )
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelLoadError(f"LoRA: {exc}") from exc


def check_vocabulary(loaded: LoadedModel, vocab: Sequence[str]) -> list[str]:
    """Task words the tokenizer cannot represent: they map to the unknown token, encode
    to nothing, or do not decode back to themselves. An empty list means fine."""
    tok = loaded.tokenizer
    unk = tok.unk_token_id
    missing = []
    for word in dict.fromkeys(vocab):
        ids = tok.encode(word, add_special_tokens=False)
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
        if not ids or (unk is not None and unk in ids) or text != word:
            missing.append(word)
    return missing
