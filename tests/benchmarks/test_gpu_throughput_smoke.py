"""Smoke test of benchmarks/gpu_throughput.py at tiny size on the CPU (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "benchmarks" / "gpu_throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_batch_size(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "gpu.json"
    bench.main(["--tiny", "--batch-sizes", "1,3", "--new-tokens", "3", "--prompt-tokens", "8",
                "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["size"] == "tiny" and result["attn_implementation"] == "sdpa"
    assert [row["batch_size"] for row in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["new_tokens"] == 3 and row["prompt_tokens"] == 8 + 4 + 6
        assert row["audits_per_s"] > 0 and row["prefill_ms"] > 0 and row["peak_gpu_gib"] is None


def test_full_size_config_is_medgemma_4b() -> None:
    import torch

    bench = _load()
    model, image_size, mm_tokens = bench.build_model(False, "meta", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert 4.2e9 < params < 4.4e9  # MedGemma 4B: about 4.3 B parameters
    assert (image_size, mm_tokens) == (896, 256)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (34, 2560, 4)
