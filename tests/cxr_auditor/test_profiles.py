"""Tests of cxr_auditor.profiles: shipped profiles, validation, site overrides, routing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cxr_auditor.errors import ProfileError
from cxr_auditor.profiles import (
    SHIPPED_PROFILES,
    FakeProfile,
    OpenAIProfile,
    RulesProfile,
    TransformersProfile,
    get_profile,
    load_profiles,
    model_info,
    parse_profile,
    profile_prompt,
)
from cxr_auditor.prompts import PROMPTS, prompt_hash

SHIPPED = {
    "cxr-auditor-v2": "alex-feeel/medgemma-cxr-auditor-v2",
    "cxr-auditor-v2-adapter": "google/medgemma-1.5-4b-it",
    "cxr-auditor-v1": "alex-feeel/medgemma-cxr-auditor",
    "cxr-auditor-v1-draft": "alex-feeel/medgemma-cxr-auditor",
    "explain-my-xray": "google/medgemma-4b-it",
    "dsa-patency": "google/medgemma-1.5-4b-it",
    "nemotron-3-nano": "nvidia/NVIDIA-Nemotron-3-Nano-4B-BF16",
}


class TestShippedProfiles:
    def test_every_model_profile_names_its_model(self) -> None:
        profiles = load_profiles()
        for name, model in SHIPPED.items():
            assert profiles[name].model == model, name

    def test_file_name_matches_profile_name(self) -> None:
        for path in SHIPPED_PROFILES.glob("*.yaml"):
            assert yaml.safe_load(path.read_text())["name"] == path.stem

    def test_default_grounder_is_bf16_sdpa_greedy_json(self) -> None:
        p = get_profile("cxr-auditor-v2")
        assert isinstance(p, TransformersProfile)
        assert (p.dtype, p.attn_implementation, p.output_parser) == ("bfloat16", "sdpa", "grounding_json")
        assert p.adapter is None and not p.load_in_4bit
        assert p.generation.max_attempts == 3

    def test_adapter_profiles_merge_on_a_full_precision_base(self) -> None:
        for name, adapter in [
            ("cxr-auditor-v2-adapter", "alex-feeel/medgemma-cxr-auditor-v2-adapter"),
            ("explain-my-xray", "muhammedsayeedurrahman/ExplainMyXray-MedGemma-QLoRA"),
            ("dsa-patency", "s0close/medgemma-dsa-lora"),
        ]:
            p = get_profile(name)
            assert isinstance(p, TransformersProfile)
            assert p.adapter == adapter and p.dtype == "bfloat16" and not p.load_in_4bit

    def test_explain_my_xray_keeps_loc_tokens_and_parses_reports(self) -> None:
        p = get_profile("explain-my-xray")
        assert isinstance(p, TransformersProfile)
        assert p.output_parser == "report_loc" and p.prompt == "explain_my_xray"
        assert p.keep_tokens == [r"<loc\d{4}>"] and p.projector

    def test_dsa_patency_routes_only_xa(self) -> None:
        p = get_profile("dsa-patency")
        assert p.task == "classification"
        assert p.routes("XA") and not p.routes("DX", body_part="CHEST") and not p.routes("CR")

    def test_nemotron_reasons_and_is_a_causal_lm(self) -> None:
        p = get_profile("nemotron-3-nano")
        assert isinstance(p, TransformersProfile)
        assert p.model_class == "causal_lm" and p.generation.enable_thinking is True
        assert p.task == "draft_parsing" and p.generation.max_new_tokens == 1024

    def test_draft_parser_and_fake_variants(self) -> None:
        profiles = load_profiles()
        assert isinstance(profiles["rules"], RulesProfile)
        assert isinstance(profiles["chat-llm"], OpenAIProfile)
        assert profiles["chat-llm"].task == "draft_parsing"
        assert isinstance(profiles["fake"], FakeProfile) and profiles["fake"].task == "grounding"
        assert profiles["cxr-auditor-v1-draft"].task == "draft_parsing"


class TestValidation:
    def test_unknown_key_is_refused_naming_the_variant(self) -> None:
        with pytest.raises(ProfileError, match=r"transformers\.colour"):
            parse_profile({"name": "x", "task": "grounding", "backend": "transformers", "model": "m", "colour": 1})

    def test_unknown_backend_lists_the_variants(self) -> None:
        with pytest.raises(ProfileError, match="'transformers', 'openai', 'fake', 'rules'"):
            parse_profile({"name": "x", "task": "grounding", "backend": "onnx"})

    def test_openai_needs_base_url(self) -> None:
        with pytest.raises(ProfileError, match=r"openai\.base_url"):
            parse_profile({"name": "x", "task": "grounding", "backend": "openai", "model": "m"})

    def test_adapter_on_4bit_base_is_refused(self) -> None:
        with pytest.raises(ProfileError, match="never a 4-bit"):
            parse_profile(
                {"name": "x", "task": "grounding", "backend": "transformers", "model": "m",
                 "adapter": "a", "load_in_4bit": True}
            )

    def test_parser_must_fit_task(self) -> None:
        with pytest.raises(ProfileError, match="serves task 'draft_parsing'"):
            parse_profile({"name": "x", "task": "grounding", "backend": "fake", "parser": "draft_json"})

    def test_prompt_must_be_known(self) -> None:
        with pytest.raises(ProfileError, match="prompt must be one of"):
            parse_profile({"name": "x", "task": "grounding", "backend": "fake", "prompt": "haiku"})

    def test_classification_labels_map_to_patency(self) -> None:
        with pytest.raises(ProfileError, match="labels values"):
            parse_profile(
                {"name": "x", "task": "classification", "backend": "fake", "labels": {"ok": "fine"}}
            )

    def test_rules_backend_only_parses_drafts(self) -> None:
        with pytest.raises(ProfileError, match="only parses drafts"):
            parse_profile({"name": "x", "task": "grounding", "backend": "rules"})

    def test_bad_yaml_names_the_file(self, tmp_path: Path) -> None:
        (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
        with pytest.raises(ProfileError, match="bad.yaml"):
            load_profiles(tmp_path)


class TestSiteFolder:
    def test_site_profile_overrides_shipped_one_of_same_name(self, tmp_path: Path) -> None:
        (tmp_path / "v2.yaml").write_text(
            yaml.safe_dump(
                {"name": "cxr-auditor-v2", "task": "grounding", "backend": "transformers",
                 "model": "/models/v2", "dtype": "float16"}
            )
        )
        p = get_profile("cxr-auditor-v2", tmp_path)
        assert p.model == "/models/v2" and isinstance(p, TransformersProfile) and p.dtype == "float16"
        assert get_profile("cxr-auditor-v1", tmp_path).model == SHIPPED["cxr-auditor-v1"]

    def test_duplicate_name_in_one_folder_is_refused(self, tmp_path: Path) -> None:
        body = yaml.safe_dump({"name": "dup", "task": "grounding", "backend": "fake"})
        (tmp_path / "a.yaml").write_text(body)
        (tmp_path / "b.yaml").write_text(body)
        with pytest.raises(ProfileError, match="defined twice"):
            load_profiles(tmp_path)

    def test_unknown_name_lists_known_profiles(self) -> None:
        with pytest.raises(ProfileError, match=r"unknown profile 'nope'; known profiles: .*cxr-auditor-v2"):
            get_profile("nope")

    def test_missing_site_folder_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(ProfileError, match="not a folder"):
            load_profiles(tmp_path / "absent")


class TestRouting:
    def _profile(self) -> FakeProfile:
        p = parse_profile(
            {"name": "r", "task": "grounding", "backend": "fake",
             "routing": [{"modality": ["DX", "CR"], "body_part": ["chest"], "view_position": ["PA", "AP"]},
                         {"sop_class_uid": ["1.2.840.10008.5.1.4.1.1.7"]}]}
        )
        assert isinstance(p, FakeProfile)
        return p

    def test_all_attributes_of_a_rule_must_match(self) -> None:
        p = self._profile()
        assert p.routes("DX", "1.2.3", "CHEST", "PA")
        assert p.routes("cr", None, " Chest ", "ap")
        assert not p.routes("DX", None, "CHEST", "LL")
        assert not p.routes("DX", None, None, "PA")  # attribute absent: the rule cannot match

    def test_any_rule_is_enough(self) -> None:
        assert self._profile().routes("OT", "1.2.840.10008.5.1.4.1.1.7")

    def test_no_rules_routes_everything(self) -> None:
        p = parse_profile({"name": "n", "task": "grounding", "backend": "fake"})
        assert p.routes("MR") and p.routes(None)


class TestProvenance:
    def test_profile_prompt_is_the_named_one_else_the_tasks_default(self) -> None:
        named = get_profile("explain-my-xray")
        assert named.prompt is not None
        assert profile_prompt(named, "grounding") == PROMPTS[named.prompt]
        unnamed = named.model_copy(update={"prompt": None})
        assert profile_prompt(unnamed, "grounding") == PROMPTS["grounding"]

    def test_model_info_names_the_model_and_hashes_the_prompt(self) -> None:
        profile = get_profile("cxr-auditor-v2-adapter")
        info = model_info(profile, "a prompt")
        assert (info.profile, info.task, info.backend) == (profile.name, profile.task, profile.backend)
        assert (info.model_id, info.revision, info.adapter) == (
            profile.model,
            profile.revision,
            profile.adapter,
        )
        assert info.prompt_hash == prompt_hash("a prompt") != prompt_hash("another prompt")
        assert model_info(profile, None).prompt_hash is None
