"""Tests of cxr_auditor.drafts.llm: model-backed draft parsing (Nemotron, v1, chat LLMs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_auditor.chat import ChatRequest
from cxr_auditor.chat.transformers import TransformersChat
from cxr_auditor.drafts.llm import LLMDraftParser, build_draft_parser
from cxr_auditor.drafts.rules import RulesDraftParser
from cxr_auditor.errors import ProfileError
from cxr_auditor.labels import Label
from cxr_auditor.profiles import TransformersProfile, get_profile, parse_profile
from cxr_auditor.prompts import CORRECTIVE_SUFFIX
from cxr_auditor.schema import DraftState, DraftStatus, Laterality
from tests.support.model_fixtures import ScriptedChat, tiny_profile

DRAFT = "Small left pleural effusion.\nNo pneumothorax."
GOOD = (
    '[{"label": "pleural_effusion", "status": "present", "span": "small left pleural effusion"},'
    ' {"label": "pneumothorax", "status": "absent", "span": "No pneumothorax"},'
    ' {"label": "nodule_mass", "status": "present", "span": "a mass in the apex"}]'
)


def _nemotron(chat: ScriptedChat) -> LLMDraftParser:
    return LLMDraftParser(get_profile("nemotron-3-nano"), chat)


class TestLLMDraftParser:
    def test_reasoning_is_stripped_and_spans_reanchored_or_dropped(self) -> None:
        answer = "<think>The draft mentions [effusion] and {no} pneumothorax.</think>\n" + GOOD
        result = _nemotron(ScriptedChat([answer])).parse(DRAFT)
        assert result.state is DraftState.PARSED and result.parser == "nemotron-3-nano"
        effusion, ptx = result.findings
        assert (effusion.label, effusion.status) == (Label.PLEURAL_EFFUSION, DraftStatus.PRESENT)
        assert (effusion.span, effusion.start) == ("Small left pleural effusion", 0)
        assert effusion.laterality is Laterality.LEFT
        assert (ptx.label, ptx.status) == (Label.PNEUMOTHORAX, DraftStatus.ABSENT)
        assert DRAFT[ptx.start : ptx.end] == "No pneumothorax"
        assert "finding_dropped:span_not_in_draft" in result.notes

    def test_unclosed_truncated_reasoning_never_becomes_the_answer(self) -> None:
        truncated = "<think>maybe [{\"label\": \"cardiomegaly\", \"status\": \"present\", \"span\": \"No"
        result = _nemotron(ScriptedChat([truncated, truncated])).parse(DRAFT)
        assert result.state is DraftState.UNPARSEABLE and result.findings == []

    def test_only_failed_drafts_are_asked_again_with_the_corrective_suffix(self) -> None:
        chat = ScriptedChat(["not json at all", GOOD, GOOD])
        results = _nemotron(chat).parse_many(["No pneumothorax.", DRAFT])
        assert [len(reqs) for reqs, _ in chat.calls] == [2, 1]
        retried = chat.calls[1][0][0].text
        assert retried.endswith(CORRECTIVE_SUFFIX) and "No pneumothorax." in retried
        assert [r.state for r in results] == [DraftState.PARSED, DraftState.PARSED]
        assert "attempts:2" in results[0].notes and "attempts:1" in results[1].notes
        assert results[0].findings[0].status is DraftStatus.ABSENT

    def test_empty_draft_is_unparseable_without_asking_the_model(self) -> None:
        chat = ScriptedChat([])
        result = _nemotron(chat).parse("   ")
        assert result.state is DraftState.UNPARSEABLE and result.notes == ["draft_empty"]
        assert chat.calls == []

    def test_requests_carry_no_image(self) -> None:
        chat = ScriptedChat([GOOD])
        _nemotron(chat).parse(DRAFT)
        assert chat.calls[0][0][0].image is None and chat.calls[0][0][0].text.rstrip().endswith(DRAFT.strip())

    def test_grounding_profile_is_refused(self) -> None:
        with pytest.raises(ProfileError, match="not draft_parsing"):
            LLMDraftParser(get_profile("cxr-auditor-v2"), ScriptedChat([]))

    def test_rules_profile_builds_the_rule_parser(self) -> None:
        assert isinstance(build_draft_parser(get_profile("rules")), RulesDraftParser)


class TestOpenAIDraftParser:
    def test_chat_llm_profile_over_http(self) -> None:
        from tests.support.openai_server import ChatServer

        chat = ScriptedChat(["<think>\nchecking</think>" + GOOD])
        server = ChatServer({"draft-parser": chat}).start()
        try:
            data = get_profile("chat-llm").model_dump(mode="json")
            data.update(base_url=server.base_url, generation={"enable_thinking": True})
            result = LLMDraftParser(parse_profile(data)).parse(DRAFT)
        finally:
            server.stop()
        assert [(f.label, f.status) for f in result.findings] == [
            (Label.PLEURAL_EFFUSION, DraftStatus.PRESENT),
            (Label.PNEUMOTHORAX, DraftStatus.ABSENT),
        ]
        body = server.requests[0]
        assert body["chat_template_kwargs"] == {"enable_thinking": True}
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema["items"]["properties"]["status"]["enum"] == ["present", "absent", "uncertain"]
        assert body["messages"][0]["content"] == [{"type": "text", "text": chat.calls[0][0][0].text}]


class TestTinyModels:
    """The real chat path on tiny models of the real architectures (answers are random)."""

    def _nemotron_profile(self, model: Path, thinking: bool) -> TransformersProfile:
        profile = parse_profile(
            tiny_profile(
                "nemotron-3-nano",
                model,
                generation={"max_new_tokens": 8, "retries": 1, "enable_thinking": thinking},
            )
        )
        assert isinstance(profile, TransformersProfile)
        return profile

    @pytest.mark.parametrize(("thinking", "tail"), [(True, "<think>\n"), (False, "<think></think>")])
    def test_nemotron_template_honours_enable_thinking(
        self, tiny_nemotron: Path, thinking: bool, tail: str
    ) -> None:
        chat = TransformersChat(self._nemotron_profile(tiny_nemotron, thinking))
        batch = chat._encode([ChatRequest("Draft: x")])
        prompt = chat.loaded.tokenizer.decode(batch["input_ids"][0])
        assert prompt.endswith("<|im_start|>assistant\n" + tail)

    def test_nemotron_h_parser_runs_the_ladder(self, tiny_nemotron: Path) -> None:
        parser = LLMDraftParser(self._nemotron_profile(tiny_nemotron, True))
        results = parser.parse_many([DRAFT, "No effusion."])
        assert [r.state for r in results] == [DraftState.UNPARSEABLE] * 2
        assert all("attempts:2" in r.notes for r in results)

    def test_v1_draft_profile_runs_gemma_without_an_image(self, tiny_gemma: Path) -> None:
        profile = parse_profile(
            tiny_profile("cxr-auditor-v1-draft", tiny_gemma, generation={"max_new_tokens": 4, "retries": 0})
        )
        parser = LLMDraftParser(profile)
        assert isinstance(parser.chat, TransformersChat)
        batch = parser.chat._encode([ChatRequest("Draft: x")])
        assert "pixel_values" not in batch
        assert parser.parse(DRAFT).state is DraftState.UNPARSEABLE
