"""Tiny models of the real architectures, built offline for tests (see offline-models.md).

* Gemma 3 image-text (MedGemma's architecture): byte-level tokenizer with the Gemma special
  tokens, image tokens and ``<loc0000>``…``<loc1023>``; 64×64 processor with 4 image tokens.
* Nemotron-H causal LM (Nemotron-3 Nano's architecture) with a chat template that honours
  ``enable_thinking``.
* LoRA adapters for the adapter profiles (non-zero B, so a merge changes the weights; a
  zero-initialised one proves a no-op merge is refused) and a multi-modal projector file.
* :func:`train_gemma3` teaches a tiny Gemma 3 to answer a black image and a white image with two
  known strings, so end-to-end tests can assert real parsed content.

Every builder writes a folder that ``from_pretrained`` loads back. torch/transformers are
imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
IMAGE_SIZE = 64
IMAGE_SEQ_LENGTH = 4

# Gemma-style template: one user turn, image part(s) then text; optional system text is folded
# into the user turn as Gemma does.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Nemotron-style template: thinking on adds an open <think> after the assistant header; off adds
# an empty, closed block (the real template does the same).
NEMOTRON_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think></think>' }}"
    "{%- else -%}{{ '<think>\n' }}{%- endif -%}{%- endif -%}"
)

BLACK_ANSWER = '[{"label": "no_finding", "box_2d": null}]'
WHITE_ANSWER = '[{"label": "pneumothorax", "box_2d": [0.1, 0.6, 0.5, 0.9]}]'


def solid_image(value: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A uniform RGB image (0 = black, 255 = white): the two inputs the trained model knows."""
    return Image.new("RGB", (size, size), (value, value, value))


def _byte_level_tokenizer(
    specials: list[str], added: list[str], chat_template: str, **named: Any
) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.add_tokens(specials, special_tokens=True)
    if added:
        # <locNNNN> are normal added tokens (as in Gemma): kept by skip_special_tokens=True.
        fast.add_tokens(added, special_tokens=False)
    fast.chat_template = chat_template
    return fast


def gemma_tokenizer() -> Any:
    """Byte-level Gemma-3-like tokenizer with image tokens and ``<locNNNN>`` tokens."""
    return _byte_level_tokenizer(
        GEMMA_SPECIALS,
        LOC_TOKENS,
        GEMMA_CHAT_TEMPLATE,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


def build_gemma3(folder: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Save an untrained tiny Gemma 3 image-text model with its processor under ``folder``."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    tok = gemma_tokenizer()
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_pan_and_scan=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=GEMMA_CHAT_TEMPLATE,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            # Prompts are byte-level (~1.5k tokens): the window must see the image tokens.
            "max_position_embeddings": 4096,
            "sliding_window": 4096,
            "pad_token_id": ids("<pad>"),
            "bos_token_id": ids("<bos>"),
            "eos_token_id": ids("<eos>"),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        mm_tokens_per_image=IMAGE_SEQ_LENGTH,
        image_token_index=ids("<image_soft_token>"),
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<bos>"),
        eos_token_id=ids("<eos>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = ids("<pad>")
    model.generation_config.eos_token_id = [ids("<eos>"), ids("<end_of_turn>")]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_nemotron_h(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny ``nemotron_h`` hybrid (Mamba, attention, Mamba, MLP) with its tokenizer."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = _byte_level_tokenizer(
        specials,
        [],
        NEMOTRON_CHAT_TEMPLATE,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    ids = tok.convert_tokens_to_ids
    cfg = NemotronHConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        hybrid_override_pattern="M*M-",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        chunk_size=16,
        max_position_embeddings=512,
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<s>"),
        eos_token_id=ids("<|im_end|>"),
    )
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_lora(
    base: Path,
    folder: Path,
    *,
    zero: bool = False,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    modules_to_save: list[str] | None = None,
    seed: int = 1,
) -> Path:
    """Save a PEFT LoRA adapter for the Gemma 3 model at ``base``.

    ``zero=False`` fills B with random values so merging changes the base weights; ``zero=True``
    keeps PEFT's zero-initialised B, i.e. an adapter whose merge is a silent no-op.
    ``modules_to_save`` saves whole modules with the adapter (how a projector can travel).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        modules_to_save=modules_to_save,
        init_lora_weights=True,
    )
    peft_model = get_peft_model(model, cfg)
    if not zero:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
                elif "modules_to_save" in name:  # a trained copy differs from the base
                    param.add_(torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(folder)
    return folder


def save_projector(base: Path, path: Path, *, seed: int = 2) -> dict[str, Any]:
    """Write a perturbed multi-modal projector (safetensors) as ExplainMyXray ships one beside
    its adapter; returns the tensors written (keys relative to ``multi_modal_projector``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    state = {
        f"multi_modal_projector.{k}": (v + torch.randn(v.shape, generator=gen)).contiguous()
        for k, v in model.model.multi_modal_projector.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def _answer_batch(processor: Any, examples: list[tuple[int, str, str]]) -> Any:
    """Inputs and labels for teacher forcing: loss only on the answer tokens (+ end of turn)."""
    import torch

    tok = processor.tokenizer
    tok.padding_side = "right"
    full, prompt_lens, images = [], [], []
    for value, prompt, answer in examples:
        img = solid_image(value)
        images.append([img])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        head = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[head], images=[[img]], add_special_tokens=False, return_tensors="pt")
        prompt_lens.append(enc["input_ids"].shape[1])
        full.append(head + answer + "<end_of_turn>")
    batch = processor(
        text=full, images=images, padding=True, add_special_tokens=False, return_tensors="pt"
    )
    labels = batch["input_ids"].clone()
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def train_gemma3(
    folder: Path,
    examples: list[tuple[int, str, str]],
    *,
    steps: int = 400,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Build a tiny Gemma 3 under ``folder`` and train it on ``examples``: (grey value of a
    solid image, prompt, answer) triples, so that greedy decoding reproduces each answer."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    build_gemma3(folder, seed=seed)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    torch.manual_seed(seed)
    batch = _answer_batch(processor, examples)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    (folder / "train_loss.json").write_text(json.dumps({"loss": float(loss.detach())}))
    return folder


def builder_fingerprint(extra: str = "") -> str:
    """Hash of this module's source, the library versions and ``extra`` (e.g. the training
    examples): a cached model is reused only while all of them match."""
    import torch
    import transformers

    import tests.support.tinymodels as me

    text = inspect.getsource(me) + torch.__version__ + transformers.__version__ + extra
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root(basetemp: Path) -> Path:
    """Where built models are cached: pytest's per-user temp folder (``pytest-of-<user>``),
    which outlives one session, or ``basetemp`` itself when it is elsewhere (``--basetemp``)."""
    for parent in [basetemp, *basetemp.parents]:
        if parent.name.startswith("pytest-of-"):
            return parent / "tinymodels-cache"
    return basetemp / "tinymodels-cache"


def cached(root: Path, name: str, build: Any, key: str = "") -> Path:
    """``root/name-<fingerprint>``, built once with ``build(folder)``.

    A lock file makes parallel test workers wait for one build instead of each training its
    own; the build happens in a private folder renamed into place, so a crashed build never
    leaves a half-written model behind.
    """
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{name}-{builder_fingerprint(key)}"
    with (root / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.is_dir():
            return folder
        scratch = root / f".{folder.name}.{os.getpid()}"
        if scratch.exists():
            shutil.rmtree(scratch)
        build(scratch)
        scratch.rename(folder)
    return folder
