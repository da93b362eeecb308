"""The in-process chat backend: a model and its adapter loaded with transformers.

:class:`TransformersChat` loads a model in this process, once, when it is built (the worker
builds it at start). torch, transformers and peft are imported inside functions only, so
``import cxr_auditor`` works without them. Loading failures become :class:`ModelUnavailable`
naming the profile and what is missing.

Gemma 3 layout (reference-notes §3.4): no system turn, one user turn whose content is the image
part first, then the text part. Batches are left-padded so every row's new tokens start at the
same position.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_auditor.chat.base import ChatRequest
from cxr_auditor.chat.hub import check_weights, is_local_ref
from cxr_auditor.errors import BackendError, ModelUnavailable
from cxr_auditor.profiles import Generation, TransformersProfile
from cxr_auditor.retry import AttemptSettings

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "TransformersChat",
    "decode_new_tokens",
    "load_model",
    "resolve_device",
]

#: Names under which adapter repositories ship a separate multi-modal projector.
_PROJECTOR_MODULE = "multi_modal_projector"
#: How many merged layers the delta check compares exactly (clones stay small on a 4B model).
_DELTA_SAMPLE_LAYERS = 8


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to generate. ``processor`` is the tokenizer for causal LMs."""

    profile_name: str
    model: Any
    processor: Any
    tokenizer: Any
    device: str
    image_text: bool
    merge_delta: float | None = None
    notes: list[str] = field(default_factory=list)


def _import_torch() -> Any:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelUnavailable(
            f"torch/transformers are not installed ({exc.name}); install the 'models' extra"
        ) from exc
    return torch


def resolve_device(requested: str, profile_name: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is present, else ``cpu`` (correct but slow).

    Raises:
        ModelUnavailable: a CUDA device was asked for and there is none.
    """
    torch = _import_torch()
    has_cuda = bool(torch.cuda.is_available())
    if requested == "auto":
        if not has_cuda:
            logger.warning("profile %s: no CUDA device, running on CPU (slow)", profile_name)
        return "cuda" if has_cuda else "cpu"
    if requested.startswith("cuda") and not has_cuda:
        raise ModelUnavailable(f"profile {profile_name!r}: device {requested!r} but no CUDA GPU")
    return requested


def _explain_load_error(profile_name: str, what: str, exc: BaseException) -> ModelUnavailable:
    """Translate hub / IO / memory failures into one line saying what is missing."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "outofmemory" in lowered.replace(" ", "") or "out of memory" in lowered:
        reason = "out of memory while loading (free GPU memory or use a smaller dtype)"
    elif "gated" in lowered or "401" in lowered or "403" in lowered or "access to model" in lowered:
        reason = "gated repository: accept its licence on the hub and set HF_TOKEN"
    elif "offline" in lowered or "localentrynotfound" in lowered or "couldn't connect" in lowered:
        reason = "weights not available offline (download them or point the profile at a folder)"
    elif "not a valid model identifier" in lowered or "repositorynotfound" in lowered or (
        "does not appear to have" in lowered
    ):
        reason = "no such repository or folder, or it holds no weights"
    else:
        reason = text.splitlines()[0][:300]
    return ModelUnavailable(f"profile {profile_name!r}: cannot load {what}: {reason}")


def _dtype(torch: Any, name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def _quantization(profile: TransformersProfile, device: str) -> Any:
    if not profile.load_in_4bit:
        return None
    if not device.startswith("cuda"):
        raise ModelUnavailable(
            f"profile {profile.name!r}: 4-bit loading needs a CUDA GPU (device is {device})"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelUnavailable(
            f"profile {profile.name!r}: 4-bit loading needs bitsandbytes, which is not installed"
        ) from exc
    torch = _import_torch()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _check_hub_reachable(profile: str, what: str, repo_id: str, revision: str | None) -> None:
    """Fail fast when hub weights are neither cached nor downloadable.

    Without this, an offline host spends about half a minute in huggingface_hub's retry
    ladder on every load attempt before the same failure; the agent retries the load
    periodically, so the model state would read ``loading`` most of the time. The check is
    :func:`~cxr_auditor.chat.hub.check_weights`, the one ``cxr-agent doctor`` reports.
    """
    check = check_weights(what, repo_id, revision)
    if not check.loadable:
        raise ModelUnavailable(f"profile {profile!r}: {what} {check.detail}")


def load_model(profile: TransformersProfile) -> LoadedModel:
    """Load the profile's model (and merge its adapter) once, in eval mode.

    Raises:
        ModelUnavailable: missing dependency, weights, GPU, licence, memory; or an adapter whose
            merge did not change the weights (a silent no-op is never served).
    """
    torch = _import_torch()
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    for what, ref in (("model", profile.model), ("adapter", profile.adapter)):
        if ref and is_local_ref(ref) and not Path(ref).expanduser().is_dir():
            raise ModelUnavailable(f"profile {profile.name!r}: {what} folder {ref} does not exist")
        if ref and not is_local_ref(ref):
            _check_hub_reachable(profile.name, what, ref, profile.revision)
    device = resolve_device(profile.device, profile.name)
    quant = _quantization(profile, device)
    image_text = profile.model_class == "image_text_to_text"
    kwargs: dict[str, Any] = {"dtype": _dtype(torch, profile.dtype)}
    if profile.revision:
        kwargs["revision"] = profile.revision
    if profile.attn_implementation:
        kwargs["attn_implementation"] = profile.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": device}  # weights straight onto the GPU, no host copy
    try:
        if image_text:
            processor = AutoProcessor.from_pretrained(profile.model, revision=profile.revision)
            tokenizer = processor.tokenizer
        else:
            processor = tokenizer = AutoTokenizer.from_pretrained(
                profile.model, revision=profile.revision
            )
        auto = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
        model = auto.from_pretrained(profile.model, **kwargs)
    except (OSError, ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        raise _explain_load_error(profile.name, f"model {profile.model}", exc) from exc
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(profile.name, model, processor, tokenizer, device, image_text)
    if profile.adapter:
        loaded.model = _merge_adapter(profile, model, loaded)
    loaded.model.eval()
    logger.info(
        "profile %s loaded on %s (%s)%s",
        profile.name,
        device,
        profile.dtype,
        "" if loaded.merge_delta is None else f", adapter merged (max |delta| {loaded.merge_delta:.3g})",
    )
    return loaded


def _lora_layers(peft_model: Any) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A]


def _merge_adapter(profile: TransformersProfile, model: Any, loaded: LoadedModel) -> Any:
    """PEFT-load the adapter on the bf16 base, merge it, and prove the merge changed weights.

    The check clones the base weights of a sample of LoRA-wrapped layers before merging and
    compares after: a zero-initialised or mismatched adapter merges as a no-op, which would
    silently serve the base model under the adapter's name.
    """
    torch = _import_torch()
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelUnavailable(
            f"profile {profile.name!r}: adapters need peft, which is not installed"
        ) from exc
    assert profile.adapter is not None
    try:
        peft_model = PeftModel.from_pretrained(model, profile.adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _explain_load_error(profile.name, f"adapter {profile.adapter}", exc) from exc
    layers = _lora_layers(peft_model)
    if not layers:
        raise ModelUnavailable(
            f"profile {profile.name!r}: adapter {profile.adapter} wraps no layer of the base model"
        )
    step = max(1, len(layers) // _DELTA_SAMPLE_LAYERS)
    sample = layers[::step][:_DELTA_SAMPLE_LAYERS]
    before = {n: m.base_layer.weight.detach().float().cpu().clone() for n, m in sample}
    merged = peft_model.merge_and_unload()
    after = dict(merged.named_modules())
    delta = 0.0
    for name, old in before.items():
        plain = name.removeprefix("base_model.model.")
        new = after[plain].weight.detach().float().cpu()
        delta = max(delta, float((new - old).abs().max()))
    if not delta > profile.min_merge_delta:
        raise ModelUnavailable(
            f"profile {profile.name!r}: merging adapter {profile.adapter} did not change the base "
            f"weights (max |delta| {delta:.3g} <= {profile.min_merge_delta:g}); refusing to serve "
            "the base model under the adapter's name"
        )
    loaded.merge_delta = delta
    if profile.projector:
        _load_projector(profile, merged, peft_model, loaded, torch)
    return merged


def _projector_file(profile: TransformersProfile) -> Path | None:
    assert profile.adapter is not None and profile.projector is not None
    local = Path(profile.adapter) / profile.projector
    if Path(profile.adapter).is_dir():
        return local if local.is_file() else None
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(profile.adapter, profile.projector))
    except EntryNotFoundError:
        return None
    except OSError as exc:
        raise _explain_load_error(profile.name, f"projector {profile.projector}", exc) from exc


def _load_projector(
    profile: TransformersProfile, merged: Any, peft_model: Any, loaded: LoadedModel, torch: Any
) -> None:
    """Load the trained multi-modal projector: from a file beside the adapter when there is one,
    else it must have come with the adapter as ``modules_to_save``."""
    path = _projector_file(profile)
    if path is None:
        saved = getattr(peft_model.peft_config.get("default"), "modules_to_save", None) or []
        if any(_PROJECTOR_MODULE in m for m in saved):
            loaded.notes.append("projector:modules_to_save")
            return
        raise ModelUnavailable(
            f"profile {profile.name!r}: projector weights {profile.projector} not found beside "
            f"adapter {profile.adapter}, and the adapter does not save the projector"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    module = next(m for n, m in merged.named_modules() if n.endswith(_PROJECTOR_MODULE))
    mine = {
        k.split(f"{_PROJECTOR_MODULE}.", 1)[1]: v for k, v in state.items() if _PROJECTOR_MODULE in k
    }
    try:
        module.load_state_dict(mine, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailable(
            f"profile {profile.name!r}: projector file {path.name} does not fit the model: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    loaded.notes.append("projector:file")


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def decode_new_tokens(tokenizer: Any, rows: Any, keep_tokens: list[str]) -> list[str]:
    """Decode generated ids, dropping special tokens except those matching ``keep_tokens``.

    Equivalent to ``skip_special_tokens=True`` when nothing is kept; with patterns such as
    ``<loc\\d{4}>`` box tokens survive even where a tokenizer marks them special.
    """
    special = set(tokenizer.all_special_ids) | {
        idx for idx, tok in tokenizer.added_tokens_decoder.items() if tok.special
    }
    keep = [re.compile(p) for p in keep_tokens]
    kept_ids: set[int] = set()
    if keep:
        for token, idx in tokenizer.get_vocab().items():
            if idx in special and any(p.fullmatch(token) for p in keep):
                kept_ids.add(idx)
    drop = special - kept_ids
    out = []
    for row in rows:
        ids = [int(i) for i in row if int(i) not in drop]
        out.append(tokenizer.decode(ids, skip_special_tokens=False))
    return out


class TransformersChat:
    """In-process chat backend. The model loads in ``__init__`` (once, at worker start)."""

    def __init__(self, profile: TransformersProfile, loaded: LoadedModel | None = None) -> None:
        self.profile = profile
        self.loaded = loaded if loaded is not None else load_model(profile)

    @property
    def generation(self) -> Generation:
        return self.profile.generation

    def _messages(self, req: ChatRequest) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if req.system:
            messages.append({"role": "system", "content": req.system})
        if self.loaded.image_text:
            parts: list[dict[str, Any]] = [{"type": "image"}] if req.image is not None else []
            parts.append({"type": "text", "text": req.text})
            messages.append({"role": "user", "content": parts})
        else:
            if req.image is not None:
                raise BackendError(f"profile {self.profile.name!r}: a text-only model got an image")
            messages.append({"role": "user", "content": req.text})
        return messages

    def _encode(self, requests: list[ChatRequest]) -> Any:
        loaded = self.loaded
        template_kwargs: dict[str, Any] = {}
        if self.generation.enable_thinking is not None:
            template_kwargs["enable_thinking"] = self.generation.enable_thinking
        texts = [
            loaded.processor.apply_chat_template(
                self._messages(r), add_generation_prompt=True, tokenize=False, **template_kwargs
            )
            for r in requests
        ]
        with_image = [r.image is not None for r in requests]
        if any(with_image) and not all(with_image):
            raise BackendError("a batch mixes requests with and without an image")
        # The chat template already wrote <bos>; the tokenizer must not add a second one.
        if loaded.image_text and all(with_image):
            return loaded.processor(
                text=texts,
                images=[[r.image.convert("RGB")] for r in requests if r.image is not None],
                padding=True,
                add_special_tokens=False,
                return_tensors="pt",
            )
        return loaded.tokenizer(
            texts, padding=True, add_special_tokens=False, return_tensors="pt"
        )

    def _stop_ids(self) -> list[int]:
        """End-of-sequence ids of the generation config plus the tokenizer's own: some
        checkpoints (Nemotron) ship a generation config whose EOS is not the chat's end token."""
        configured = self.loaded.model.generation_config.eos_token_id
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        own = self.loaded.tokenizer.eos_token_id
        if own is not None and own not in ids:
            ids.append(own)
        return ids

    def generate(self, requests: list[ChatRequest], settings: AttemptSettings) -> list[str]:
        """Generate one answer per request in one left-padded batch (greedy or sampled)."""
        if not requests:
            return []
        torch = _import_torch()
        loaded = self.loaded
        batch = self._encode(requests).to(loaded.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(loaded.model.dtype)
        gen: dict[str, Any] = {
            "max_new_tokens": self.generation.max_new_tokens,
            "pad_token_id": loaded.tokenizer.pad_token_id,
            "eos_token_id": self._stop_ids(),
        }
        if settings.do_sample:
            sampling = self.generation.sampling
            gen.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            with torch.inference_mode():
                out = loaded.model.generate(**batch, **gen)
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(
                f"profile {self.profile.name!r}: out of GPU memory generating a batch of "
                f"{len(requests)}"
            ) from exc
        new = out[:, batch["input_ids"].shape[1] :].cpu()
        return decode_new_tokens(loaded.tokenizer, new, self.profile.keep_tokens)

    def close(self) -> None:
        torch = _import_torch()
        self.loaded.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
