"""Tests of the in-process transformers backend on tiny Gemma 3 models (CPU, float32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cxr_auditor.chat import ChatRequest
from cxr_auditor.chat.transformers import TransformersChat, decode_new_tokens, load_model
from cxr_auditor.errors import ModelUnavailable
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding import build_grounder
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.grounding.transformers import TransformersGrounder
from cxr_auditor.labels import Label
from cxr_auditor.profiles import TransformersProfile, parse_profile
from cxr_auditor.prompts import CORRECTIVE_SUFFIX, DSA_PATENCY_PROMPT, EXPLAIN_MY_XRAY_PROMPT
from cxr_auditor.retry import AttemptSettings, attempt_settings
from cxr_auditor.schema import GroundingState
from tests import tinymodels as tm
from tests.conftest_models import GREY, tiny_profile


def _image(value: int, index: int = 0, size: int = tm.IMAGE_SIZE) -> ImageInput:
    return ImageInput(tm.solid_image(value, size), index, Geometry.identity(size, size))


def _profile(name: str, model: Path, **fields: Any) -> TransformersProfile:
    profile = parse_profile(tiny_profile(name, model, **fields))
    assert isinstance(profile, TransformersProfile)
    return profile


class _Spy:
    """Wraps a chat backend and records every batch it is asked to generate."""

    def __init__(self, inner: TransformersChat) -> None:
        self.inner = inner
        self.calls: list[tuple[list[ChatRequest], AttemptSettings]] = []

    def generate(self, requests: list[ChatRequest], settings: AttemptSettings) -> list[str]:
        self.calls.append((requests, settings))
        return self.inner.generate(requests, settings)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
class TestTrainedGrounder:
    """The trained tiny model answers black → no_finding, white → pneumothorax with a box."""

    @pytest.mark.parametrize("shipped", ["cxr-auditor-v2", "cxr-auditor-v1"])
    def test_batch_of_images_yields_each_images_answer(self, trained_gemma: Path, shipped: str) -> None:
        grounder = build_grounder(_profile(shipped, trained_gemma, prompt="explain_my_xray"))
        assert isinstance(grounder, TransformersGrounder)
        results = grounder.ground([_image(0, 0), _image(255, 1), _image(0, 2, size=96)])
        assert [r.state for r in results] == [GroundingState.OK] * 3
        assert [f.label for f in results[0].findings] == [Label.NO_FINDING]
        (ptx,) = results[1].findings
        assert ptx.label is Label.PNEUMOTHORAX and ptx.image_index == 1
        assert ptx.box is not None and ptx.box.as_list() == pytest.approx([0.1, 0.6, 0.5, 0.9])
        assert results[2].findings[0].image_index == 2 and results[0].attempts == 1
        assert grounder.info.profile == shipped and grounder.info.prompt_hash

    def test_left_padding_keeps_rows_of_different_length_exact(self, trained_gemma: Path) -> None:
        chat = TransformersChat(_profile("cxr-auditor-v2", trained_gemma))
        assert chat.loaded.tokenizer.padding_side == "left"
        answers = chat.generate(
            [
                ChatRequest(EXPLAIN_MY_XRAY_PROMPT, tm.solid_image(0)),
                ChatRequest(DSA_PATENCY_PROMPT, tm.solid_image(255)),
            ],
            attempt_settings(1),
        )
        assert answers == [tm.BLACK_ANSWER, "The vessel is occluded."]

    def test_only_failed_images_are_regenerated_with_the_ladder(self, trained_gemma: Path) -> None:
        # 64 new tokens hold the JSON answers and keep the failing rungs short.
        profile = _profile(
            "cxr-auditor-v2",
            trained_gemma,
            prompt="explain_my_xray",
            generation={"max_new_tokens": 64, "retries": 2},
        )
        spy = _Spy(TransformersChat(profile))
        grounder = TransformersGrounder(profile, spy.inner.loaded)
        grounder.chat = spy
        # The grey image gets the report answer: not JSON, so it climbs the whole ladder.
        results = grounder.ground([_image(0, 0), _image(GREY, 1)])
        assert [len(reqs) for reqs, _ in spy.calls] == [2, 1, 1]
        (_, first), (retry, second), (_, third) = spy.calls
        assert not first.do_sample and not second.do_sample and third.do_sample
        assert retry[0].text.endswith(CORRECTIVE_SUFFIX)
        assert results[0].state is GroundingState.OK and results[0].attempts == 1
        assert results[1].state is GroundingState.FAILED and results[1].attempts == 3
        assert results[1].raw_text and results[1].notes == ["unparseable_after_retries"]


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
        loaded = load_model(_profile("cxr-auditor-v2-adapter", tiny_gemma, adapter=str(lora_adapter)))
        assert loaded.merge_delta is not None and loaded.merge_delta > 0.01
        assert not any("lora" in n for n, _ in loaded.model.named_parameters())

    def test_no_op_merge_is_refused(self, tiny_gemma: Path, zero_lora_adapter: Path) -> None:
        profile = _profile("cxr-auditor-v2-adapter", tiny_gemma, adapter=str(zero_lora_adapter))
        with pytest.raises(ModelUnavailable, match="did not change the base weights"):
            load_model(profile)

    def test_projector_file_beside_the_adapter_is_loaded(
        self, tiny_gemma: Path, projector_adapter: Path
    ) -> None:
        from safetensors.torch import load_file

        loaded = load_model(_profile("explain-my-xray", tiny_gemma, adapter=str(projector_adapter)))
        assert "projector:file" in loaded.notes
        saved = load_file(str(projector_adapter / "multi_modal_projector.safetensors"))
        module = loaded.model.model.multi_modal_projector
        for key, value in module.state_dict().items():
            assert value.equal(saved[f"multi_modal_projector.{key}"])

    def test_projector_in_modules_to_save_is_accepted(self, tiny_gemma: Path, tmp_path: Path) -> None:
        adapter = tm.build_lora(tiny_gemma, tmp_path / "mts", modules_to_save=["multi_modal_projector"])
        loaded = load_model(_profile("explain-my-xray", tiny_gemma, adapter=str(adapter)))
        assert loaded.notes == ["projector:modules_to_save"]

    def test_missing_projector_is_refused(self, tiny_gemma: Path, lora_adapter: Path) -> None:
        with pytest.raises(ModelUnavailable, match="projector weights .* not found"):
            load_model(_profile("explain-my-xray", tiny_gemma, adapter=str(lora_adapter)))

    def test_missing_weights_name_profile_and_cause(self, tmp_path: Path) -> None:
        with pytest.raises(ModelUnavailable, match="profile 'cxr-auditor-v2': model folder .* does not exist"):
            load_model(_profile("cxr-auditor-v2", tmp_path / "absent"))

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
        start = time.monotonic()
        with pytest.raises(ModelUnavailable, match="not in the local cache") as info:
            load_model(profile)
        assert time.monotonic() - start < 10
        assert ("offline" in str(info.value)) is offline

    def test_folder_without_weights_names_the_cause(self, tmp_path: Path) -> None:
        (tmp_path / "empty").mkdir()
        with pytest.raises(ModelUnavailable, match="profile 'cxr-auditor-v2': cannot load model"):
            load_model(_profile("cxr-auditor-v2", tmp_path / "empty"))

    def test_4bit_on_cpu_is_refused(self, tiny_gemma: Path) -> None:
        with pytest.raises(ModelUnavailable, match="4-bit loading needs a CUDA GPU"):
            load_model(_profile("cxr-auditor-v2", tiny_gemma, load_in_4bit=True))

    def test_cuda_without_gpu_is_refused(self, tiny_gemma: Path) -> None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        with pytest.raises(ModelUnavailable, match="no CUDA GPU"):
            load_model(_profile("cxr-auditor-v2", tiny_gemma, device="cuda"))
