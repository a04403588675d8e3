"""Issue 20: a file is written in the format its name says, or refused before any work.

``visualize --out`` (and every figure, :func:`fusion_seg.plots.save_figure`) writes what matplotlib's Agg
canvas writes for the suffix; ``plan --json`` and ``bench --json`` write JSON, ``bench --markdown`` and
``--update`` Markdown, and a name whose suffix says another format is refused while the command line is read.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fusion_seg.cli import main
from fusion_seg.errors import UserError

pytest.importorskip("matplotlib")

from fusion_seg import plots  # noqa: E402
from fusion_seg.reports import visualize as vis  # noqa: E402

MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "jpg": b"\xff\xd8\xff", "jpeg": b"\xff\xd8\xff", "tiff": b"II*\x00",
         "eps": b"%!PS-Adobe", "webp": b"RIFF"}


def _figure():
    fig = plots.new_figure(2, 1)
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


@pytest.mark.parametrize("suffix", sorted(MAGIC) + ["svg"])
def test_a_figure_is_written_in_the_format_of_its_suffix(tmp_path, suffix):
    out = plots.save_figure(_figure(), tmp_path / f"fig.{suffix.upper() if suffix == 'jpeg' else suffix}")
    data = out.read_bytes()
    if suffix == "svg":
        assert b"<svg" in data[:2000]
    else:
        assert data.startswith(MAGIC[suffix]), data[:16]


@pytest.mark.parametrize("name", ["fig.xyz", "fig", "fig.pgf", "fig.png.txt"])
def test_a_figure_name_without_a_writable_format_is_refused_naming_the_formats(tmp_path, name):
    with pytest.raises(UserError) as info:
        plots.save_figure(_figure(), tmp_path / name)
    message = str(info.value)
    assert name in message and ".png" in message and ".pdf" in message and ".svg" in message and "\n" not in message
    assert not list(tmp_path.iterdir())


@pytest.fixture
def no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(vis, "load_model", fail)


def test_visualize_refuses_an_unknown_suffix_before_loading(tmp_path, no_model):
    result = CliRunner().invoke(main, ["visualize", "--checkpoint", str(tmp_path / "best.pt"), "--input",
                                       str(tmp_path / "img.png"), "--out", str(tmp_path / "fig.xyz")])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "fig.xyz" in result.output and ".pdf" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


# ----- plan and bench ---------------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """plan and bench stop where their work would start, with a line that says so."""
    import fusion_seg.reports.bench as bench
    import fusion_seg.reports.plan as plan

    def reached(*args, **kwargs):
        raise UserError("the work started")

    monkeypatch.setattr(plan, "plan", reached)
    monkeypatch.setattr(bench, "run_bench", reached)


@pytest.mark.parametrize("args,option", [
    (["plan", "--dataset", "synthetic", "--size", "64x64", "--json", "plan.csv"], "--json"),
    (["plan", "--dataset", "synthetic", "--size", "64x64", "--json", "plan.md"], "--json"),
    (["bench", "--json", "bench.md"], "--json"),
    (["bench", "--markdown", "bench.json"], "--markdown"),
    (["bench", "--update", "BENCHMARKS.txt"], "--update"),
])
def test_plan_and_bench_refuse_a_file_named_for_another_format(tmp_path, no_work, args, option):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "the work started" not in result.output and option in result.output
    assert (".json" if option == "--json" else ".md") in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args", [
    ["plan", "--dataset", "synthetic", "--size", "64x64", "--json", "plan.JSON"],
    ["plan", "--dataset", "synthetic", "--size", "64x64", "--json", "plan"],
    ["bench", "--json", "b.json", "--markdown", "b.md", "--update", "BENCHMARKS.md"],
])
def test_plan_and_bench_take_names_of_their_formats(tmp_path, no_work, args):
    result = CliRunner().invoke(main, args)
    assert "the work started" in result.output, result.output
