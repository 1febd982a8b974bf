"""The report: one index.html (styles, script and the run summaries inlined) and the samples' pages as data files
beside it, loaded only when a page needs them, so a run of any size opens at once.

    <out>/index.html                   curves, the sample index (one short row per sample), eval tables
    <out>/data/r<run>/<file>.<k>.js    the pages of up to CHUNK samples of one records file

The files are plain scripts (`frChunk(name, {...})`): a page opened from disk may load scripts beside it but not
fetch files. Nothing in them names an outside address: every "/" and "<" in the data is written as a JSON escape,
so the report cannot even spell one, and the viewer's own code refers to none. Every file is written whole and
renamed into place; a rebuild rewrites only the data of record files that changed (`--serve`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import time
from collections import defaultdict
from typing import Any

import jinja2

from fr_jax.trainer.records import read_prompts, read_records
from fr_jax.view.digest import digest
from fr_jax.view.runs import RunInputs, read_run

CHUNK = 200
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
# Curve sections in display order: exact keys, or prefixes ending in "/"; keys matching none go to "Other".
CURVE_GROUPS = (
    (
        "Reward terms",
        (
            "reward/total",
            "reward/performance",
            "reward/complexity",
            "reward/efficiency",
            "reward/format",
            "reward/overlong",
            "reward/",
        ),
    ),
    ("Tests and format", ("pass_rate", "all_pass_rate", "well_formed")),
    ("Worker LLM per query", ("worker/calls", "worker/tokens", "worker/")),
    ("Groups", ("groups/zero_variance_frac", "groups/")),
    ("Responses", ("response/length_mean", "response/length_max", "response/truncated_frac", "response/")),
    ("Policy update: KL and clipping", ("train/kl", "train/clip/", "train/ratio/", "train/mismatch/", "train/")),
    ("Time per phase", ("time/rollout_s", "time/sandbox_s", "time/train_s", "time/sync_s", "time/round_s", "time/")),
    ("Held-out evaluation", ("eval/",)),
)
TITLES = {"well_formed": "format-valid rate", "pass_rate": "test pass rate", "all_pass_rate": "all tests passed"}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("fr_jax.view", "assets"), autoescape=True, keep_trailing_newline=True
)


def embed(value: Any) -> str:
    """JSON that is safe inside <script> and spells no address: "/" and "<" become \\/ and \\u003c."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c").replace("/", "\\/")


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def curve_sections(runs: list[RunInputs]) -> list[dict[str, Any]]:
    """Every numeric metric over steps, one curve per key with a series per run, grouped into sections."""
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r, run in enumerate(runs):
        points: dict[str, tuple[list, list]] = {}
        for line in run.metrics:
            for key, value in line.items():
                if key != "step" and isinstance(value, int | float) and value == value:  # NaN: no point
                    xs, ys = points.setdefault(key, ([], []))
                    xs.append(line["step"])
                    ys.append(value)
        for key, (xs, ys) in points.items():
            series[key].append({"run": r, "x": xs, "y": ys})
    placed: dict[str, list[str]] = defaultdict(list)
    for key in series:
        section = next(
            (
                title
                for title, keys in CURVE_GROUPS
                if key in keys or any(p.endswith("/") and key.startswith(p) for p in keys)
            ),
            "Other",
        )
        placed[section].append(key)
    order = [title for title, _ in CURVE_GROUPS] + ["Other"]
    rank = {key: i for _, keys in CURVE_GROUPS for i, key in enumerate(keys)}
    return [
        {
            "title": title,
            "curves": [
                {"key": key, "title": TITLES.get(key, key), "series": series[key]}
                for key in sorted(placed[title], key=lambda k: (rank.get(k, len(rank)), k))
            ],
        }
        for title in order
        if placed[title]
    ]


def _source_label(first: dict | None, path: pathlib.Path) -> dict[str, Any]:
    """What a records file holds, from its first record (its name when it is empty)."""
    if first is None:
        return {
            "label": path.name.removesuffix(".jsonl.gz"),
            "kind": None,
            "round": None,
            "method": None,
            "split": None,
        }
    kind, round_index, method, split = first["kind"], first["round"], first["method"], first["split"]
    if kind == "grpo":
        label = f"round {round_index}"
    else:
        label = f"eval {split}/{method}" + (f" after round {round_index}" if round_index is not None else "")
    return {"label": label, "kind": kind, "round": round_index, "method": method, "split": split}


@dataclasses.dataclass
class _FileDigest:
    signature: tuple[int, int]
    source: dict[str, Any]
    rows: list[dict[str, Any]]
    chunks: list[str]


class ReportBuilder:
    """Builds the report of `run_dirs` into `out_dir`; call `build()` again to refresh it (only record files that
    changed since the last build are read again)."""

    def __init__(self, run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, *, live: bool = False):
        self.run_dirs = [pathlib.Path(p) for p in run_dirs]
        if not self.run_dirs:
            raise ValueError("give at least one run directory")
        self.out_dir = pathlib.Path(out_dir)
        self.live = live
        self.names = _run_names(self.run_dirs)
        self._files: dict[tuple[int, pathlib.Path], _FileDigest] = {}
        self._build: str | None = None

    def build(self) -> dict[str, Any]:
        """Write the report; returns {"samples", "files_read", "seconds", "index"}."""
        started = time.perf_counter()
        runs = [read_run(path, name) for path, name in zip(self.run_dirs, self.names)]
        read_now = 0
        sources, columns, chunks = [], defaultdict(list), []
        live_files = {}
        for r, run in enumerate(runs):
            for path in run.record_files:
                stat = path.stat()
                key, signature = (r, path), (stat.st_mtime_ns, stat.st_size)
                done = self._files.get(key)
                if done is None or done.signature != signature:
                    done = self._digest_file(r, run, path, signature)
                    read_now += 1
                live_files[key] = done
                source = len(sources)
                sources.append({"run": r, **done.source})
                first_chunk = len(chunks)
                chunks += done.chunks
                for i, row in enumerate(done.rows):
                    for name, value in row.items():
                        columns[name].append(value)
                    columns["source"].append(source)
                    columns["chunk"].append(first_chunk + i // CHUNK)
                    columns["offset"].append(i % CHUNK)
        self._files = live_files
        self._remove_stale_chunks({c for d in live_files.values() for c in d.chunks})
        data = {
            "title": " vs ".join(self.names),
            "live": self.live,
            "runs": [
                {"name": name, "path": str(run.path), "color": COLORS[i % len(COLORS)]}
                for i, (name, run) in enumerate(zip(self.names, runs))
            ],
            "sections": curve_sections(runs),
            "sources": sources,
            "index": columns,
            "chunks": chunks,
            "evals": eval_tables(runs, sources),
        }
        build = hashlib.sha1(embed(data).encode()).hexdigest()[:12]
        index = self.out_dir / "index.html"
        if build != self._build or not index.is_file():  # an unchanged run leaves an open page alone
            data.update(build=build, built=datetime.datetime.now().isoformat(timespec="seconds"))
            page = _TEMPLATES.get_template("report.html").render(
                title=data["title"], data=embed(data), css=_asset("report.css"), script=_asset("report.js")
            )
            _write(index, page)
            _write(self.out_dir / "build.json", json.dumps({"build": build}))
            self._build = build
        return {
            "samples": len(columns["source"]),
            "files_read": read_now,
            "seconds": time.perf_counter() - started,
            "index": index,
        }

    def _digest_file(self, r: int, run: RunInputs, path: pathlib.Path, signature: tuple[int, int]) -> _FileDigest:
        records = read_records(path)
        result = digest(records)
        names = []
        stem = path.name.removesuffix(".jsonl.gz")
        for k in range(0, len(result.details), CHUNK):
            part = result.details[k : k + CHUNK]
            prompts = read_prompts(run.path, {d["prompt_sha"] for d in part if d.get("prompt_sha")})
            name = f"r{r}/{stem}.{k // CHUNK}"
            _write(
                self.out_dir / "data" / f"{name}.js",
                f"frChunk({embed(name)},{embed({'prompts': prompts, 'samples': part})});\n",
            )
            names.append(name)
        source = {**_source_label(records[0] if records else None, path), "stats": _stats(records, result.rows)}
        return _FileDigest(signature, source, result.rows, names)

    def _remove_stale_chunks(self, keep: set[str]) -> None:
        data = self.out_dir / "data"
        if data.is_dir():
            for path in data.glob("r*/*.js"):
                if f"{path.parent.name}/{path.name.removesuffix('.js')}" not in keep:
                    path.unlink()


def _stats(records: list[dict], rows: list[dict]) -> dict[str, float | None]:
    """An evaluation's figures from its records (for evaluations no report covers)."""
    if not records:
        return {}

    def mean(values: list) -> float | None:
        return sum(values) / len(values) if values and None not in values else None

    return {
        "samples": len(records),
        "tasks": len({r["task_id"] for r in records}),
        "all tests passed": mean([row["outcome"] == "passed" for row in rows]),
        "reward": mean([r["reward"]["total"] for r in records]),
        "format-valid": mean([r.get("well_formed") is not False for r in records]),
        "worker_calls": mean([r.get("worker_calls") for r in records]),
        "worker_tokens": mean([r.get("worker_tokens") for r in records]),
    }


def _asset(name: str) -> str:
    return _TEMPLATES.loader.get_source(_TEMPLATES, name)[0]


def _run_names(paths: list[pathlib.Path]) -> list[str]:
    """Each run's folder name, with its parent's when two runs share one."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return [name if names.count(name) == 1 else f"{name} ({i})" for i, name in enumerate(names)]


def eval_tables(runs: list[RunInputs], sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs' eval reports, each row linked to the records of its evaluation (a source index, or None), and a
    table for each evaluation inside a GRPO run whose records no report covers (figures from the records)."""
    out = []
    linked = set()
    for r, run in enumerate(runs):
        for table in run.evals:
            rows = []
            for row in table.rows:
                source = _find_source(sources, r, table.split, row["method"])
                linked.add(source)
                rows.append({**row, "source": source})
            out.append({"run": r, **dataclasses.asdict(table), "rows": rows, "from_records": False})
    return out + _record_tables(sources, linked)


def _find_source(sources: list[dict[str, Any]], run: int, split: str | None, method: str) -> int | None:
    found = [
        i
        for i, s in enumerate(sources)
        if s["run"] == run and s["kind"] == "eval" and s["method"] == method and split in (None, s["split"])
    ]
    standalone = [i for i in found if sources[i]["round"] is None]
    return (standalone or found or [None])[-1]


def _record_tables(sources: list[dict[str, Any]], linked: set[int | None]) -> list[dict[str, Any]]:
    by_eval: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        if s["kind"] == "eval" and i not in linked:
            by_eval[(s["run"], s["split"], s["round"])].append(i)
    return [
        {
            "run": run,
            "title": f"after round {round_index}, from the records" if round_index is not None else "from the records",
            "split": split,
            "columns": list(dict.fromkeys(key for i in members for key in sources[i]["stats"])),
            "rows": [{"method": sources[i]["method"], "values": sources[i]["stats"], "source": i} for i in members],
            "per_task": {},
            "samples_per_task": None,
            "from_records": True,
        }
        for (run, split, round_index), members in by_eval.items()
    ]
