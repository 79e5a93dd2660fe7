"""Requests checked once (farcast_cli/requests.py): a request's constructor refuses every value a user can
get wrong before any file is read, naming the parameter from Python and the flag from the command line;
and the texts of a report name options the same way."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import FAST

from farcast_cli import commands
from farcast_cli.errors import UsageError
from farcast_cli.model.fit import FitSettings
from farcast_cli.requests import FitRequest, PredictRequest

QUIET = commands.StreamOptions(quiet=True)


@pytest.mark.parametrize(
    "fields, python, args, shown",
    [
        ({"horizon": 40, "schedule": "keep"}, "schedule keep applies only to a resumable=True output",
         ("--schedule", "keep"), "--schedule keep applies only to a --resumable output"),
        ({"horizon": 40, "resumable": True}, "resumable=True needs schedule keep or schedule advance",
         ("--resumable",), "--resumable needs --schedule keep or --schedule advance"),
        ({"horizon": 40, "settings": lambda: FitSettings(shrink=11.0)}, "shrink 11: expected a factor between 0 and 10",
         ("--shrink", "11"), "--shrink 11: expected a factor between 0 and 10"),
        ({"horizon": 40, "dtype": "F8"}, "dtype 'F8': expected one of BF16, F16, F32, F64", None, None),
        ({"horizon": 40, "output_format": "npz"}, "output_format 'npz': expected one of same, safetensors", None, None),
    ],
)  # fmt: skip
def test_a_predict_request_refuses_bad_values_naming_the_parameter_or_the_flag(tmp_path, farcast, fields, python, args, shown):
    missing = tmp_path / "no-such-run"
    with pytest.raises(UsageError) as raised:
        PredictRequest(missing, tmp_path / "out", **{key: value() if callable(value) else value for key, value in fields.items()})
    assert str(raised.value).startswith(python)
    if args is not None:
        result = farcast("predict", missing, "-H", 40, "-o", tmp_path / "out", *args, expect=2)
        assert result.stderr.startswith(f"farcast: error: {shown}"), result.stderr


def test_fit_settings_and_a_fit_request_name_their_parameters():
    with pytest.raises(UsageError, match="^sample must be at least 2; batch_size, max_updates, patience and lr positive"):
        FitSettings(sample=1)
    with pytest.raises(UsageError, match="^objective 'l3': expected l1 or l2$"):
        FitSettings(objective="l3")
    with pytest.raises(UsageError, match="^horizon is required"):
        FitRequest("run", "f.json")
    with pytest.raises(UsageError, match="^validation_run is for fitting on a reference run: give context_end too$"):
        FitRequest("run", "f.json", horizon=10, validation_run="other")


def test_the_python_api_takes_a_request_and_its_fields_alike(run_dir, tmp_path):
    settings = FitSettings(sample=2000, max_updates=100, shrink=0.5)
    request = PredictRequest(run_dir, tmp_path / "a", horizon=40, settings=settings, options=QUIET)
    by_request = commands.run_predict(request)
    by_fields = commands.predict(run_dir, tmp_path / "b", horizon=40, settings=settings, options=QUIET)
    assert by_request.forecaster == by_fields.forecaster and by_request.written == by_fields.written
    plan = commands.plan_predict(replace(request, out_dir=tmp_path / "c"))
    assert plan.written_steps == [request.offsets[-1] + by_request.context.last_step]


def test_report_texts_name_parameters_from_python_and_flags_from_the_command_line(run_dir, tmp_path, farcast):
    settings = FitSettings(sample=2000, max_updates=100, shrink=0.5)
    report = commands.predict(run_dir, tmp_path / "a", horizon=40, settings=settings, options=QUIET, resumable=True, schedule="keep")
    assert any(note.endswith("set by shrink") for note in report.notes)
    assert report.verdict.endswith("give evaluation to decide by your loss.")
    assert any(line.startswith("schedule keep: ") for line in report.resume.advice)
    shown = json.loads(
        farcast(
            "predict", run_dir, "-H", 40, "-o", tmp_path / "b", "--shrink", "0.5", "--resumable", "--schedule", "keep", "--json", *FAST
        ).stdout
    )
    assert any(note.endswith("set by --shrink") for note in shown["notes"])
    assert shown["verdict"].endswith("give --eval-cmd to decide by your loss.")
    assert any(line.startswith("--schedule keep: ") for line in shown["resume"]["advice"])
    assert all("\x00" not in line for line in [*report.notes, report.verdict, *shown["notes"]])
