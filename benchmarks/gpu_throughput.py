"""GPU throughput of the grounding model at MedGemma 4B size (Gemma 3 image-text), random weights.

Builds ``Gemma3ForConditionalGeneration`` from the published MedGemma 4B / Gemma 3 4B
configuration (below) with random weights, so nothing is downloaded, and measures, in bf16 with
SDPA attention, for each batch size:

* prefill time (one forward pass over the prompt: 256 image tokens + the text),
* decode time per generated token (a fixed number of new tokens, EOS suppressed),
* audits per second (batch size / time of the whole ``generate`` call),
* peak GPU memory (``torch.cuda.max_memory_allocated``).

Random weights do not change the arithmetic of a forward pass, so the timings stand for the real
model at the same shapes; the answer text is meaningless. ``--tiny`` runs the same code at a tiny
size on the CPU in float32 (a smoke test; the test suite runs it).

Run: ``.venv/bin/python benchmarks/gpu_throughput.py [--batch-sizes 1,2,4,8,16,32]
[--new-tokens 64] [--prompt-tokens 350] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

#: Gemma 3 4B / MedGemma 4B (google/medgemma-4b-it, google/medgemma-1.5-4b-it config.json).
MEDGEMMA_4B_TEXT: dict[str, Any] = {
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 262208,
    "sliding_window": 1024,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}
MEDGEMMA_4B_VISION: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}
MEDGEMMA_4B_MM_TOKENS = 256
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = 262144, 255999, 256000

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 262208,
    "sliding_window": 1024,
}
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 8,
}
TINY_MM_TOKENS = 4


def build_model(tiny: bool, device: str, dtype: Any) -> tuple[Any, int, int]:
    """Random-weight Gemma 3 image-text model; returns (model, image size, image tokens)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (MEDGEMMA_4B_TEXT, MEDGEMMA_4B_VISION)
    mm_tokens = TINY_MM_TOKENS if tiny else MEDGEMMA_4B_MM_TOKENS
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI_TOKEN,
        eoi_token_index=EOI_TOKEN,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: no float32 copy of 4B params
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), vision["image_size"], mm_tokens


def make_batch(batch: int, prompt_tokens: int, image_size: int, mm_tokens: int, device: str, dtype: Any) -> dict[str, Any]:
    """Token ids laid out as the chat template does (bos, turn, image block, text), random
    text ids, random pixels."""
    import torch

    gen = torch.Generator().manual_seed(1)
    text = torch.randint(1000, 200000, (batch, prompt_tokens), generator=gen)
    head = torch.tensor([2, 105, 2364, 107, BOI_TOKEN])  # <bos><start_of_turn>user\n<start_of_image>
    image = torch.full((mm_tokens,), IMAGE_TOKEN)
    tail = torch.tensor([EOI_TOKEN])
    row = torch.cat([head, image, tail])
    ids = torch.cat([row.expand(batch, -1), text], dim=1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": (ids == IMAGE_TOKEN).long().to(device),
        "pixel_values": torch.rand((batch, 3, image_size, image_size), generator=gen).to(device, dtype),
    }


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    model: Any, batch: dict[str, Any], new_tokens: int, device: str, repeats: int
) -> dict[str, float | int | None]:
    """Median prefill and generate times over ``repeats`` runs (after one warm-up)."""
    import torch

    size = batch["input_ids"].shape[0]
    gen_kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # EOS suppressed: every run decodes the same length
        "do_sample": False,
        "pad_token_id": 0,
    }
    prefill, total = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        # Prefill as generate runs it: logits of the last position only (all positions would
        # be batch x prompt x 262k vocabulary, gigabytes that generate never computes).
        model(**batch, logits_to_keep=1)  # warm-up (kernels, allocator)
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(**batch, logits_to_keep=1)
            _sync(device)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(**batch, **gen_kwargs)
            _sync(device)
            total.append(time.perf_counter() - t0)
    generated = out.shape[1] - batch["input_ids"].shape[1]
    pre, tot = statistics.median(prefill), statistics.median(total)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "batch_size": size,
        "prompt_tokens": batch["input_ids"].shape[1],
        "new_tokens": generated,
        "prefill_ms": pre * 1000,
        "prefill_ms_per_image": pre * 1000 / size,
        "decode_ms_per_token": (tot - pre) * 1000 / max(generated, 1),
        "generate_ms": tot * 1000,
        "audits_per_s": size / tot,
        "peak_gpu_gib": peak,
    }


def environment(device: str) -> dict[str, str]:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = str(torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=350, help="text tokens after the image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    if args.tiny:
        device, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        parser.error("no CUDA GPU: run with --tiny for the CPU smoke test")
    model, image_size, mm_tokens = build_model(args.tiny, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for size in (int(b) for b in args.batch_sizes.split(",")):
        batch = make_batch(size, args.prompt_tokens, image_size, mm_tokens, device, dtype)
        try:
            rows.append(measure(model, batch, args.new_tokens, device, args.repeats))
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch_size": size, "error": "out of memory"})
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "gpu_throughput",
        "size": "tiny" if args.tiny else "medgemma-4b",
        "parameters": params,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": "sdpa",
        "environment": environment(device),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
