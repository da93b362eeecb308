"""Audit one image: examples, uploads (picture and DICOM), a stored instance, limits, keeping."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image
from starlette.testclient import TestClient

from dicom_agent.config import AgentSettings
from dicom_agent.web.audit_one import EXAMPLES, example_picture
from tests.dicom_agent.web.conftest import WebAgent
from tests.support.builders import make_cxr, save


def raw_json(html: str) -> dict:  # type: ignore[type-arg]
    import html as html_lib

    text = html.split('<details id="raw-json">', 1)[1].split("<pre>", 1)[1].split("</pre>", 1)[0]
    return json.loads(html_lib.unescape(text))  # type: ignore[no-any-return]


def verdict(html: str) -> str:
    return re.search(r'<p class="verdict" id="verdict">([^<]+)</p>', html).group(1)  # type: ignore[union-attr]


def test_the_form_lists_the_examples_and_stored_images(
    client: TestClient, web_agent: WebAgent
) -> None:
    web_agent.store("1.2.9.1", "PICK-1")
    html = client.get("/audit").text
    assert "RESEARCH USE ONLY" in html
    for name in EXAMPLES:
        assert f'id="example-{name}"' in html
    assert "PICK-1 DX PA" in html


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("clean-normal", set()),  # dark picture: the fake answers no finding; the draft is normal
        ("missed-nodule", {"missing", "urgent"}),  # bright: the fake's findings, denied by the draft
        ("unsupported-claim", {"unsupported"}),  # dark: the draft's effusion is not on the image
    ],
)
def test_examples_run_through_the_agents_model(
    client: TestClient, name: str, kinds: set[str]
) -> None:
    html = client.post("/audit", data={"example": name}).text
    result = raw_json(html)
    assert {f["kind"] for f in result["flags"]} == kinds
    assert result["models"][0]["profile"] == "fake"
    assert verdict(html).startswith("No flags" if not kinds else f"{len(result['flags'])} flag(s)")
    overlay = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)  # type: ignore[union-attr]
    import base64

    assert Image.open(io.BytesIO(base64.b64decode(overlay))).size == (512, 512)


def test_upload_a_png_with_a_pasted_draft(client: TestClient, settings: AgentSettings) -> None:
    buffer = io.BytesIO()
    example_picture(EXAMPLES["missed-nodule"], 300).save(buffer, format="PNG")
    html = client.post(
        "/audit", data={"draft": "Right pleural effusion. Left pneumothorax."},
        files={"image": ("chest.png", buffer.getvalue(), "image/png")},
    ).text
    result = raw_json(html)
    assert result["inputs"]["images"][0]["width"] == 300
    assert [f["label"] for f in result["draft"]["findings"]] == ["pleural_effusion", "pneumothorax"]
    assert '<mark class="span span-present"' in html
    assert not settings.web.uploads.exists()  # not kept by default


def test_upload_a_dicom_file_and_keep_it_when_configured(
    client: TestClient, settings: AgentSettings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    settings.web.keep_uploads = True
    path = save(make_cxr(rows=96, cols=80), tmp_path / "one.dcm")
    html = client.post("/audit", data={"draft": ""},
                       files={"image": ("one.dcm", path.read_bytes(), "application/dicom")}).text
    result = raw_json(html)
    assert result["inputs"]["images"][0]["view_position"] == "PA"
    (kept,) = list(settings.web.uploads.iterdir())
    assert sorted(p.name for p in kept.iterdir()) == ["audit.json", "upload.dcm"]


def test_pick_a_stored_instance(client: TestClient, web_agent: WebAgent) -> None:
    sop = web_agent.store("1.2.9.2", "PICK-2")
    result = raw_json(client.post("/audit", data={"instance": sop, "draft": "Normal."}).text)
    assert result["inputs"]["images"][0]["sop_instance_uid"] == sop


def test_bad_inputs_are_explained(client: TestClient, settings: AgentSettings) -> None:
    r = client.post("/audit", data={"draft": "x"})
    assert r.status_code == 400 and "choose an image" in r.text
    r = client.post("/audit", files={"image": ("x.png", b"not a picture", "image/png")})
    assert r.status_code == 400 and "neither DICOM nor a readable" in r.text
    settings.web.max_upload_bytes = 1000
    r = client.post("/audit", files={"image": ("x.png", b"\0" * 5000, "image/png")})
    assert r.status_code == 400 and "max_upload_bytes" in r.text
    assert client.post("/audit", data={"instance": "1.2.3.4.5"}).status_code == 400


def test_an_unavailable_model_is_reported(client: TestClient, web_agent: WebAgent) -> None:
    from cxr_auditor.errors import ModelUnavailable
    from dicom_agent.registry import Models

    def broken(name: str):  # type: ignore[no-untyped-def]
        raise ModelUnavailable("weights not found")

    web_agent.models = Models(broken, 60)
    r = client.post("/audit", data={"example": "clean-normal"})
    assert r.status_code == 400 and "weights not found" in r.text


def test_one_sentence_with_two_labels_is_one_highlight_with_both(client: TestClient) -> None:
    html = client.post("/audit", data={"example": "clean-normal"}).text
    assert 'title="pleural_effusion (absent), pneumothorax (absent)">No pleural effusion or' \
        ' pneumothorax<' in html
