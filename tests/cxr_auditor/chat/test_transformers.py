"""Tests of the in-process transformers chat backend (cxr_auditor.chat.transformers): loading,
adapter merge, decoding and batched generation on tiny Gemma 3 models (CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_auditor.chat import ChatRequest
from cxr_auditor.chat.transformers import TransformersChat, decode_new_tokens, load_model
from cxr_auditor.errors import ModelUnavailable
from cxr_auditor.profiles import parse_profile
from cxr_auditor.prompts import DSA_PATENCY_PROMPT, EXPLAIN_MY_XRAY_PROMPT
from cxr_auditor.retry import attempt_settings
from tests.support import tinymodels as tm
from tests.support.model_fixtures import transformers_profile


@pytest.mark.slow
class TestGeneration:
    def test_left_padding_keeps_rows_of_different_length_exact(self, trained_gemma: Path) -> None:
        chat = TransformersChat(transformers_profile("cxr-auditor-v2", trained_gemma))
        assert chat.loaded.tokenizer.padding_side == "left"
        answers = chat.generate(
            [
                ChatRequest(EXPLAIN_MY_XRAY_PROMPT, tm.solid_image(0)),
                ChatRequest(DSA_PATENCY_PROMPT, tm.solid_image(255)),
            ],
            attempt_settings(1),
        )
        assert answers == [tm.BLACK_ANSWER, "The vessel is occluded."]


class TestDecoding:
    def test_kept_special_loc_tokens_survive_decoding(self) -> None:
        tok = tm._byte_level_tokenizer(
            tm.GEMMA_SPECIALS + ["<loc0007>"], [], tm.GEMMA_CHAT_TEMPLATE, eos_token="<eos>"
        )
        ids = tok.encode("box <loc0007><eos>", add_special_tokens=False)
        assert decode_new_tokens(tok, [ids], [r"<loc\d{4}>"]) == ["box <loc0007>"]
        assert decode_new_tokens(tok, [ids], []) == ["box "]

    def test_gemma_tokenizer_keeps_added_loc_tokens(self) -> None:
        tok = tm.gemma_tokenizer()
        ids = tok.encode("<loc0001><loc1023><end_of_turn>", add_special_tokens=False)
        assert decode_new_tokens(tok, [ids], []) == ["<loc0001><loc1023>"]


class TestLoading:
    def test_adapter_merge_changes_weights(self, tiny_gemma: Path, lora_adapter: Path) -> None:
        loaded = load_model(transformers_profile("cxr-auditor-v2-adapter", tiny_gemma, adapter=str(lora_adapter)))
        assert loaded.merge_delta is not None and loaded.merge_delta > 0.01
        assert not any("lora" in n for n, _ in loaded.model.named_parameters())

    def test_no_op_merge_is_refused(self, tiny_gemma: Path, zero_lora_adapter: Path) -> None:
        profile = transformers_profile("cxr-auditor-v2-adapter", tiny_gemma, adapter=str(zero_lora_adapter))
        with pytest.raises(ModelUnavailable, match="did not change the base weights"):
            load_model(profile)

    def test_projector_file_beside_the_adapter_is_loaded(
        self, tiny_gemma: Path, projector_adapter: Path
    ) -> None:
        from safetensors.torch import load_file

        loaded = load_model(transformers_profile("explain-my-xray", tiny_gemma, adapter=str(projector_adapter)))
        assert "projector:file" in loaded.notes
        saved = load_file(str(projector_adapter / "multi_modal_projector.safetensors"))
        module = loaded.model.model.multi_modal_projector
        for key, value in module.state_dict().items():
            assert value.equal(saved[f"multi_modal_projector.{key}"])

    def test_projector_in_modules_to_save_is_accepted(self, tiny_gemma: Path, tmp_path: Path) -> None:
        adapter = tm.build_lora(tiny_gemma, tmp_path / "mts", modules_to_save=["multi_modal_projector"])
        loaded = load_model(transformers_profile("explain-my-xray", tiny_gemma, adapter=str(adapter)))
        assert loaded.notes == ["projector:modules_to_save"]

    def test_missing_projector_is_refused(self, tiny_gemma: Path, lora_adapter: Path) -> None:
        with pytest.raises(ModelUnavailable, match="projector weights .* not found"):
            load_model(transformers_profile("explain-my-xray", tiny_gemma, adapter=str(lora_adapter)))

    def test_missing_weights_name_profile_and_cause(self, tmp_path: Path) -> None:
        with pytest.raises(ModelUnavailable, match="profile 'cxr-auditor-v2': model folder .* does not exist"):
            load_model(transformers_profile("cxr-auditor-v2", tmp_path / "absent"))

    @pytest.mark.parametrize("offline", [True, False])
    def test_uncached_hub_weights_fail_fast_when_the_hub_is_out_of_reach(
        self, offline: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """No retry ladder against an unreachable hub: the model is unavailable at once."""
        import time

        from huggingface_hub import constants

        from tests.conftest import free_port

        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
        profile = parse_profile(
            {"name": "hub-model", "task": "grounding", "backend": "transformers",
             "model": "someone/not-cached-anywhere", "dtype": "float32"}
        )
        # The model stack is imported before the clock starts: on a loaded machine its first
        # import alone can take longer than the check this test times.
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: F401

        start = time.monotonic()
        with pytest.raises(ModelUnavailable, match="not in the local hub cache") as info:
            load_model(profile)
        assert time.monotonic() - start < 10
        assert ("HF_HUB_OFFLINE" in str(info.value)) is offline

    def test_folder_without_weights_names_the_cause(self, tmp_path: Path) -> None:
        (tmp_path / "empty").mkdir()
        with pytest.raises(ModelUnavailable, match="profile 'cxr-auditor-v2': cannot load model"):
            load_model(transformers_profile("cxr-auditor-v2", tmp_path / "empty"))

    def test_4bit_on_cpu_is_refused(self, tiny_gemma: Path) -> None:
        with pytest.raises(ModelUnavailable, match="4-bit loading needs a CUDA GPU"):
            load_model(transformers_profile("cxr-auditor-v2", tiny_gemma, load_in_4bit=True))

    def test_cuda_without_gpu_is_refused(self, tiny_gemma: Path) -> None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        with pytest.raises(ModelUnavailable, match="no CUDA GPU"):
            load_model(transformers_profile("cxr-auditor-v2", tiny_gemma, device="cuda"))
