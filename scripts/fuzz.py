#!/usr/bin/env python3
"""Runs llmem's libFuzzer targets (tests/fuzz) and keeps what they find.

Each target runs for --seconds (or --runs executions) on a working corpus kept in the fuzz build, which later
runs resume from (seeded from tests/fuzz/corpus/<target> and the regression inputs), with a dictionary of its input's tokens. An input that crashes, hangs past --timeout
seconds, runs out of memory or trips a sanitizer is copied to tests/fuzz/regressions/<target>/, which the normal
suite replays (ctest -L fuzz). Every run appends its figures (executions, coverage, corpus, findings) to
--log; --report writes docs/FUZZING.md from that log.

  bash scripts/setup.sh                                    # builds build-fuzz/ with clang as well
  python3 scripts/fuzz.py --seconds 600                    # every target, 10 minutes each
  python3 scripts/fuzz.py --targets config_json --runs 1000000
  python3 scripts/fuzz.py --report docs/FUZZING.md
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_DIR = os.path.join(REPO, "tests", "fuzz")
TARGETS = ("torchscript_import", "program_import", "config_json", "config_json_exporter", "validate_lines",
           "command_line")
# Python targets (atheris, in the project venv), beside the C++ ones of the fuzz build.
PYTHON_TARGETS = {"config_json_exporter": os.path.join(FUZZ_DIR, "config_json_fuzzer.py")}
DICTIONARIES = {
    "torchscript_import": ("archive.dict",),
    "program_import": ("archive.dict", "json.dict"),
    "config_json": ("json.dict", "records.dict"),
    "config_json_exporter": ("json.dict", "records.dict"),
    "validate_lines": ("json.dict", "records.dict"),
    "command_line": ("command_line.dict",),
}
# What libFuzzer names the inputs it stops on (-artifact_prefix): all of them are findings.
FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")
# Largest input libFuzzer makes: the archives need room for their seeds; text inputs stay small so that the
# mutations stay meaningful.
MAX_LEN = {"torchscript_import": 200_000, "program_import": 2_000_000, "config_json": 8192,
           "config_json_exporter": 8192,            "validate_lines": 8192, "command_line": 1024}


def merged_dictionary(target, workdir):
    """libFuzzer takes one -dict file: the target's dictionaries concatenated."""
    path = os.path.join(workdir, f"{target}.dict")
    with open(path, "w") as out:
        for name in DICTIONARIES[target]:
            with open(os.path.join(FUZZ_DIR, "dict", name)) as f:
                out.write(f.read() + "\n")
    return path


def last_status(stderr):
    """The coverage figures of libFuzzer's last status line (cov, ft, corp)."""
    found = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)/", stderr)
    if not found:
        return {}
    cov, ft, corp = found[-1]
    return {"edges": int(cov), "features": int(ft), "corpus_inputs": int(corp)}


def final_stats(stderr):
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", stderr))
    return {k: int(v) for k, v in stats.items()}


def keep_findings(target, artifacts, findings_root):
    """Copies each finding into findings_root/<target> under a name of its kind and content, unless it is a
    regression input already (then it keeps that name); returns their names."""
    kept = []
    dest = os.path.join(findings_root, target)
    os.makedirs(dest, exist_ok=True)
    known = {}
    for folder in {dest, os.path.join(FUZZ_DIR, "regressions", target)}:
        for existing in os.listdir(folder) if os.path.isdir(folder) else []:
            with open(os.path.join(folder, existing), "rb") as f:
                known[hashlib.sha1(f.read()).hexdigest()] = existing
    for name in sorted(os.listdir(artifacts)):
        if not name.startswith(FINDING_PREFIXES):
            continue
        with open(os.path.join(artifacts, name), "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()
        kept_name = known.get(digest, f"{name.split('-', 1)[0]}-{digest[:16]}")
        if digest not in known:
            shutil.copyfile(os.path.join(artifacts, name), os.path.join(dest, kept_name))
        os.remove(os.path.join(artifacts, name))
        kept.append(kept_name)
    return kept


def target_command(args, target):
    if target in PYTHON_TARGETS:
        return [os.path.join(REPO, ".venv", "bin", "python"), PYTHON_TARGETS[target]]
    return [os.path.join(args.build, "tests", "fuzz", f"fuzz_{target}")]


def run_target(args, target):
    command = target_command(args, target)
    binary = command[-1]
    if target not in PYTHON_TARGETS and not os.access(binary, os.X_OK):
        sys.exit(f"fuzz.py: no fuzz target {binary}: build it with scripts/setup.sh (or cmake --build "
                 f"{args.build} --target llmem_fuzzers)")
    work = args.work or os.path.join(args.build, "fuzz")
    corpus = os.path.join(work, "corpus", target)
    if args.fresh_corpus:
        shutil.rmtree(corpus, ignore_errors=True)
    artifacts = os.path.join(work, "findings", target) + os.sep
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(artifacts, exist_ok=True)
    regressions = os.path.join(FUZZ_DIR, "regressions", target)
    os.makedirs(regressions, exist_ok=True)
    # The committed seeds (the exporter's config target shares config_json's).
    seeds = os.path.join(FUZZ_DIR, "corpus", target.removesuffix("_exporter"))
    cmd = [*command, corpus, seeds, regressions, f"-dict={merged_dictionary(target, work)}",
           f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}", f"-malloc_limit_mb={args.rss_limit_mb}",
           f"-max_len={MAX_LEN[target]}", f"-artifact_prefix={artifacts}", "-print_final_stats=1",
           # The targets print (help, LibTorch's warnings): their output is not the finding, libFuzzer's is.
           "-close_fd_mask=3"]
    if args.runs:
        cmd.append(f"-runs={args.runs}")
    if args.seed:
        cmd.append(f"-seed={args.seed}")
    if args.seconds:
        cmd.append(f"-max_total_time={args.seconds}")
    started = datetime.datetime.now(datetime.timezone.utc)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    seconds = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    findings = keep_findings(target, artifacts, args.findings)
    stats = final_stats(proc.stderr)
    record = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "target": target, "seconds": round(seconds, 1),
              "executions": stats.get("number_of_executed_units", 0), "peak_rss_mb": stats.get("peak_rss_mb", 0),
              **last_status(proc.stderr), "findings": findings, "exit": proc.returncode}
    if proc.returncode != 0 and not findings:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"fuzz.py: {target} stopped (exit {proc.returncode}) without a finding:\n{tail}", file=sys.stderr)
    return record


def report(log_path, out_path):
    with open(log_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    lines = ["# Fuzzing", "",
             "Generated by `python3 scripts/fuzz.py --report docs/FUZZING.md` from the runs logged in",
             f"`{os.path.relpath(log_path, REPO)}` (every run of `scripts/fuzz.py`). Each target is a libFuzzer "
             "binary built with clang, ASan and UBSan (`build-fuzz/`, made by `scripts/setup.sh`); inputs that "
             "crashed, hung or tripped a sanitizer are kept in `tests/fuzz/regressions/` and replayed by the "
             "suite (`ctest -L fuzz`), with the seed corpus of `tests/fuzz/corpus/`.", "",
             "| target | runs | executions | since its last finding | seconds | last edges | last features | "
             "findings |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for target in TARGETS:
        mine = [r for r in runs if r["target"] == target]
        if not mine:
            lines.append(f"| {target} | 0 | 0 | 0 | 0 | | | |")
            continue
        findings = [f for r in mine for f in r["findings"]]
        last = mine[-1]
        # The runs after the last one that found something ran the code with every finding fixed.
        clean = mine[max((i + 1 for i, r in enumerate(mine) if r["findings"]), default=0):]
        lines.append(f"| {target} | {len(mine)} | {sum(r['executions'] for r in mine):,} | "
                     f"{sum(r['executions'] for r in clean):,} | "
                     f"{sum(r['seconds'] for r in mine):,.0f} | {last.get('edges', '')} | "
                     f"{last.get('features', '')} | {', '.join(findings) if findings else 'none'} |")
    lines += ["", "Executions since its last finding: those of the runs after the last run that found something "
              "(the log keeps runs in the order they ended; a finding is fixed before the next run unless it is marked open). Edges and features are libFuzzer's coverage counters of the instrumented llmem code (LibTorch, "
              "nlohmann-json and CLI11 headers compiled into it count; LibTorch's own library is not "
              "instrumented) at the end of the target's last run.", "", "## Every run", "",
              "| date | target | seconds | executions | edges | peak RSS MiB | findings |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in runs:
        lines.append(f"| {r['date']} | {r['target']} | {r['seconds']:.0f} | {r['executions']:,} | "
                     f"{r.get('edges', '')} | {r['peak_rss_mb']} | {', '.join(r['findings']) or 'none'} |")
    old = ""
    if os.path.exists(out_path):
        with open(out_path) as f:
            old = f.read()
    marker = "\n## Findings and fixes\n"
    tail = old[old.index(marker):] if marker in old else ""
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n" + tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(REPO, "build-fuzz"), help="the clang fuzz build")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--seconds", type=int, default=0, help="time per target")
    parser.add_argument("--runs", type=int, default=0, help="executions per target (stops at the first limit)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--seed", type=int, default=0,
                        help="libFuzzer's random seed (0: a new one each run); the suite's brief runs fix it")
    parser.add_argument("--rss-limit-mb", type=int, default=6144)
    parser.add_argument("--log", default=os.path.join(REPO, "docs", "fuzzing_runs.jsonl"),
                        help="where each run's figures are appended ('' for none)")
    parser.add_argument("--work", help="the working corpus and libFuzzer's artifacts (default: BUILD/fuzz)")
    parser.add_argument("--fresh-corpus", action="store_true",
                        help="start from the seeds and regression inputs alone (the suite's brief runs)")
    parser.add_argument("--findings", default=os.path.join(FUZZ_DIR, "regressions"),
                        help="where findings are kept, one folder per target (default: the regression inputs)")
    parser.add_argument("--report", metavar="FILE", help="write the summary of --log to FILE and stop")
    args = parser.parse_args()
    if args.report:
        report(args.log, args.report)
        return 0
    if not args.seconds and not args.runs:
        parser.error("give --seconds or --runs")
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            parser.error(f"unknown target '{t}' (known: {', '.join(TARGETS)})")
    found = False
    for target in targets:
        record = run_target(args, target)
        found = found or bool(record["findings"])
        print(f"{target}: {record['executions']:,} executions in {record['seconds']:.0f} s, "
              f"{record.get('edges', '?')} edges, findings: {', '.join(record['findings']) or 'none'}", flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
