"""The callmon.call/v1 contract: round trip, validation that names the field, docs in step."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from callmon.callresult import (
    SCHEMA,
    CallResult,
    ContractError,
    Phases,
    ProbeInfo,
    Sample,
    Status,
    Summary,
    Target,
    Thresholds,
    VideoSummary,
    evaluate,
    markdown,
)

ROOT = Path(__file__).resolve().parent.parent
Validate = Callable[[object], object]
"CallResult.from_dict or CallResult.check: both must refuse the same documents."


def example() -> dict[str, Any]:
    result = CallResult(
        id="8d0f1f8e-0000-4000-8000-000000000000",
        started_at="2026-11-26T22:00:00.000Z",
        target=Target(url="http://127.0.0.1:8089/whip"),
        probe=ProbeInfo(version="0.1.0", host="probe-1"),
        duration_s=10.0,
        status=Status.OK,
        samples=[Sample(t_s=1.0, rtt_s=0.012)],
    )
    return result.to_dict()


def test_it_round_trips_through_json() -> None:
    data = json.loads(json.dumps(example()))
    assert data["schema"] == SCHEMA
    assert CallResult.from_dict(data).to_dict() == data


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        (["status"], "fine", "status", "expected one of ok, degraded, failed"),
        (["samples", 0, "audio", "loss"], "5%", "samples[0].audio.loss", "expected a number"),
        (["samples", 0, "video", "frames"], 1.5, "samples[0].video.frames", "an integer"),
        (["samples", 0, "reliable"], 1, "samples[0].reliable", "expected true or false"),
        (["target", "url"], None, "target.url", "must not be null"),
        (["duration_s"], float("nan"), "duration_s", "finite"),
        (["samples"], {}, "samples", "expected a list"),
        (["schema"], "callmon.call/v0", "schema", "expected 'callmon.call/v1'"),
    ],
)
@pytest.mark.parametrize("validate", [CallResult.from_dict, CallResult.check])
def test_it_names_the_field_at_fault(
    path: list[str | int], value: object, field: str, message: str, validate: Validate
) -> None:
    data = example()
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ContractError) as caught:
        validate(data)
    assert caught.value.field == field
    assert message in caught.value.message


@pytest.mark.parametrize("validate", [CallResult.from_dict, CallResult.check])
def test_it_refuses_missing_and_unknown_fields(validate: Validate) -> None:
    validate(example())  # the control: the document as written passes
    data = example()
    del data["id"]
    with pytest.raises(ContractError, match="id: required field is missing"):
        validate(data)
    data = example()
    data["summary"]["jitter"] = 1
    with pytest.raises(ContractError, match=r"summary\.jitter: unknown field"):
        validate(data)
    with pytest.raises(ContractError, match="<root>: expected an object"):
        validate([])


def test_checking_leaves_the_document_as_sent() -> None:
    data = example()
    data["duration_s"] = 10  # an integer where the contract says number: valid, not converted
    sent = json.loads(json.dumps(data))
    CallResult.check(data)
    assert data == sent
    assert type(data["duration_s"]) is int


def test_evaluate_names_each_crossed_threshold() -> None:
    summary = Summary(av_offset_s=-0.2, mos_p10=3.0, video=VideoSummary(freezes=2, loss=0.01))
    crossed = evaluate(Phases(connect_s=0.7), summary, Thresholds())
    assert [(d.metric, d.comparison) for d in crossed] == [
        ("phases.connect_s", ">"),
        ("av_offset_s", "<"),
        ("video.freezes", ">"),
        ("mos_p10", "<"),
    ]
    assert crossed[1].threshold == -0.185
    assert evaluate(Phases(connect_s=0.5), Summary(), Thresholds()) == []


def test_the_readme_documents_every_field() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown() in readme, "regenerate with: python -m callmon.callresult"


def test_the_contract_imports_without_aiortc_or_av() -> None:
    """A central monitor installs light: the contract and the monitor never load aiortc."""
    code = (
        "import sys, callmon.callresult, callmon.cli, monitor;"
        "bad = [m for m in ('aiortc', 'av', 'aioice', 'numpy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
