"""A randomised fault campaign against the real ``nemodiff-train`` CLI; writes a JSON report.

    PYTHONPATH=. python tools/fault_campaign.py --out fault_report.json [--kills 20] [--corruptions 10]

What it does (seeded, so a report can be reproduced):

1. **kills**: chains of launches of the tiny_cpu recipe (6 steps, checkpoints every 2, export at the
   end) on one run directory, each launch with a random fault from ``NEMODIFF_FAULT``
   (``nemodiff_train/faults.py``): SIGKILL in a random phase (data preparation, mid-step,
   mid-checkpoint, between install and prune, mid-export) at a random occurrence, sometimes a
   SIGTERM/SIGUSR1 instead, sometimes under torchrun with 2 processes (DDP or FSDP2, one rank
   killed). A chain ends with a clean launch. Every training row of every launch is compared bit
   for bit with an uninterrupted run of the same world size and strategy (loss, AR/diffusion loss,
   grad norm, lr, masked-token count), and the final export's weights with the reference export.
2. **corruptions**: random damage to copies of the reference checkpoints (truncated / deleted /
   bit-flipped shard, metadata or RNG file, torn or missing trainer state, missing COMPLETE,
   another model); detected = resume skips the damaged checkpoint naming the damaged file (or the
   model mismatch) and picks the older intact one; one case is also resumed for real via the CLI.
3. **bad rows**: a directory of hostile files through data preparation; every planted bad row must
   be counted in ``meta.json`` with its reason.
4. **config fuzzing**: ``tests/faults/test_config_fuzz.run_fuzz`` (200 mutations of the recipes).
5. **hostile files** (``tests/faults/hostile.py``): every crafted DCP ``.metadata`` pickle of
   ``tests/helpers/hostile_pickles.py`` through export and resume (refused = a named error, and the
   marker file each would create is absent), a pickled call as an optimizer-setting and as a model
   byte entry resumed through the CLI, ``overwrite=true`` onto a user's directory, and the machine's
   absolute paths grepped in every exported file.

``--only hostile`` runs family 5 alone (minutes instead of hours).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.harness import base_args, launch, make_assets, metrics, reference, train_rows  # noqa: E402

PHASES = {"data": 2, "step": 6, "checkpoint": 3, "prune": 3, "export": 1}  # point -> most occurrences per launch


def _rows_identical(rows: list[dict], ref: dict) -> tuple[int, int, list[str]]:
    keys = ("loss", "ar_loss", "diffusion_loss", "grad_norm", "lr", "masked_tokens", "tokens")
    n = same = 0
    diffs = []
    for r in train_rows(rows):
        n += 1
        want = ref.get(r["step"])
        if want is not None and all(r[k] == want[k] for k in keys):
            same += 1
        else:
            diffs.append(f"step {r['step']}: {[(k, r[k], want and want[k]) for k in keys if not want or r[k] != want[k]]}")
    return n, same, diffs


def _weights_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    return bool(wa) and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def reference_run(assets: Path, work: Path, nproc: int, strategy: str) -> Path:
    """The uninterrupted run of a world size and strategy (made once)."""
    run = work / f"reference_{nproc}_{strategy}"
    if not (run / "checkpoints" / "step_00000006" / "COMPLETE").is_file():
        extra = [f"engine.distributed={strategy}"] + (["export.at_end=false"] if nproc else [])
        r = launch(base_args(assets, run, *extra), run, nproc=nproc, timeout=1800)
        if r.returncode:
            raise RuntimeError(f"reference run failed:\n{r.output[-3000:]}")
    return run


def kill_campaign(assets: Path, work: Path, n_kills: int, rng: random.Random, log, on_chain=lambda out: None) -> dict:
    def ref_run(nproc: int, strategy: str) -> Path:
        return reference_run(assets, work, nproc, strategy)

    out = {"kills_injected": 0, "kills_survived": 0, "signals_injected": 0, "signals_clean_exit": 0,
           "steps_compared": 0, "steps_identical": 0, "chains": [], "by_phase": {p: 0 for p in PHASES}, "failures": []}
    chain = 0
    while out["kills_injected"] < n_kills:
        chain += 1
        nproc, strategy = rng.choice([(0, "ddp")] * 4 + [(2, "ddp"), (2, "fsdp2")])
        ref = reference(ref_run(nproc, strategy))
        run = work / f"chain_{chain:03d}"
        args = base_args(assets, run, f"engine.distributed={strategy}", *(["export.at_end=false"] if nproc else []))
        events = []
        for _ in range(8):
            phases = [p for p in PHASES if not (nproc and p == "export")]
            phase = rng.choice(phases)
            action = rng.choice(["kill"] * 4 + ["term", "usr1"])
            fault = f"{phase}:{rng.randint(1, PHASES[phase])}" + ("" if action == "kill" else f":{action}")
            if nproc and action == "kill":
                fault += f"@{rng.randint(0, 1)}"
            r = launch(args, run, fault=fault, nproc=nproc, timeout=1800)
            n, same, diffs = _rows_identical(r.rows, ref)
            out["steps_compared"] += n
            out["steps_identical"] += same
            fired = r.returncode != 0 if action == "kill" else any(x.get("event") == "preempted" for x in r.rows)
            events.append({"fault": fault, "rc": r.returncode, "fired": fired, "steps": [x["step"] for x in train_rows(r.rows)]})
            if diffs:
                out["failures"].append({"chain": chain, "fault": fault, "diffs": diffs[:3]})
            if action == "kill" and fired:
                out["kills_injected"] += 1
                out["by_phase"][phase] += 1
            elif action != "kill" and fired:
                out["signals_injected"] += 1
                out["signals_clean_exit"] += r.returncode == 0
                if r.returncode:
                    out["failures"].append({"chain": chain, "fault": fault, "rc": r.returncode, "output": r.output[-1500:]})
            elif r.returncode:
                out["failures"].append({"chain": chain, "fault": fault, "rc": r.returncode, "output": r.output[-1500:]})
            if r.returncode == 0 and not fired:
                break  # the fault's moment never came: the run finished
            if out["kills_injected"] >= n_kills and action == "kill" and fired:
                break
        r = launch(args, run, nproc=nproc, timeout=1800)  # the clean launch that must finish the run
        n, same, diffs = _rows_identical(r.rows, ref)
        out["steps_compared"] += n
        out["steps_identical"] += same
        rows = train_rows(metrics(run))
        complete = r.returncode == 0 and sorted({x["step"] for x in rows}) == sorted(ref)
        if not nproc:
            complete = complete and _weights_equal(run / "hf", ref_run(0, "ddp") / "hf")
        kills = sum(1 for e in events if e["fired"] and e["rc"] != 0)
        out["kills_survived"] += kills if complete else 0
        out["chains"].append({"chain": chain, "nproc": nproc or 1, "strategy": strategy, "events": events,
                              "finished_and_identical": complete and not diffs})
        if not complete or diffs:
            out["failures"].append({"chain": chain, "final_rc": r.returncode, "diffs": diffs[:3], "output": r.output[-1500:]})
        log(f"chain {chain} ({nproc or 1} proc {strategy}): {[e['fault'] for e in events]} -> "
            f"{'ok' if complete and not diffs else 'FAILED'}; kills so far {out['kills_injected']}")
        shutil.rmtree(run, ignore_errors=True)
        on_chain(out)
    return out


def _corrupt(ckpt: Path, kind: str, rng: random.Random) -> str:
    """Damage ``ckpt``; returns the file (or model) the resume must name."""
    from nemodiff_train import runs
    from nemodiff_train.engines.torch import checkpointing as C

    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (runs.COMPLETE, runs.MANIFEST))
    target = rng.choice(files)
    if kind == "truncate":
        target.write_bytes(target.read_bytes()[: rng.randrange(target.stat().st_size)])
    elif kind == "delete":
        target.unlink()
    elif kind == "flip":
        b = bytearray(target.read_bytes())
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(b))
    elif kind == "torn_state":
        target = ckpt / runs.TRAINER_STATE
        target.write_text(target.read_text()[: rng.randrange(1, 20)])
    elif kind == "no_complete":
        target = ckpt
        (ckpt / runs.COMPLETE).unlink()
    else:  # another model: resume is asked for a model whose embedding differs
        return "another model"
    return str(target)


def corruption_campaign(baseline: Path, work: Path, n: int, rng: random.Random, assets: Path) -> dict:
    from nemodiff_train import runs
    from nemodiff_train.engines.torch import checkpointing as C

    kinds = ["truncate", "delete", "flip", "torn_state", "no_complete", "other_model"]
    out = {"injected": 0, "detected": 0, "cases": [], "cli_resume_after_corruption": None}
    for i in range(n):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        run = work / f"corrupt_{i:03d}"
        shutil.copytree(baseline / "checkpoints", run / "checkpoints")
        newest = run / "checkpoints" / "step_00000006"
        model = json.loads((newest / runs.MANIFEST).read_text())["model"]
        damaged = _corrupt(newest, kind, rng)
        if kind == "other_model":
            model = {**model, "model.embed_tokens.weight": [999, 32, "float32"]}
        try:
            ckpt, notes = C.select_resume(run, model)
            said = " ".join(notes)
            ok = ckpt is not None and ckpt.name == "step_00000004" and damaged in said
        except C.CheckpointError as e:  # another model: every checkpoint is refused, with the reason
            said = str(e)
            ok = kind == "other_model" and "saved from another model" in said
        out["injected"] += 1
        out["detected"] += ok
        out["cases"].append({"kind": kind, "damaged": damaged.replace(str(work), "<work>"), "detected": ok,
                             "message": said.replace(str(work), "<work>")[:300]})
        shutil.rmtree(run, ignore_errors=True)
    # one real resume through the CLI past a truncated newest checkpoint
    run = work / "corrupt_cli"
    shutil.copytree(baseline / "checkpoints", run / "checkpoints")  # prepared data records its tokenizer's path
    shard = run / "checkpoints" / "step_00000006" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = launch(base_args(assets, run, "export.at_end=false"), run)
    n, same, _ = _rows_identical(r.rows, reference(baseline))
    out["cli_resume_after_corruption"] = {"rc": r.returncode, "rows_rerun": n, "rows_identical": same,
                                          "skipped_named": f"skipping checkpoint {shard.parent}" in r.output}
    return out


def bad_rows_campaign(assets: Path, work: Path) -> dict:
    import gzip

    from nemodiff_train.data.prepare import DataPrepConfig, prepare

    d = work / "hostile"
    d.mkdir()
    planted = {"bad-json": 3, "not-an-object": 2, "wrong-type": 3, "missing-field": 2, "empty-text": 2, "non-utf8": 2,
               "over-long-chars": 1, "corrupt-file": 1}
    good = [json.dumps({"text": f"def value {i} " + "import class for in " * 5}) for i in range(60)]
    lines = good[:30] + ["{oops", "[1", "nope"] + ["[1, 2]", '"str"'] + ['{"text": 5}', '{"text": ["a"]}',
                                                                         '{"text": {"a": 1}}']
    lines += ['{"other": 1}', '{"text": null}', '{"text": ""}', '{"text": "  "}']
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    (d / "b.jsonl").write_bytes(b"\xff\xfe\x00junk\n" + b'{"text": "caf\xe9"}\n' + b'{"text": "' + b"a" * (3 << 20)
                                + b'"}\n')
    blob = gzip.compress(("\n".join(good[30:]) + "\n").encode())
    (d / "c.jsonl.gz").write_bytes(blob[: len(blob) * 2 // 3])
    out = work / "hostile_out"
    prepare(DataPrepConfig(kind="pretrain", sources=[str(d)], tokenizer=str(assets / "model"), seq_len=16,
                           out=str(out), val_fraction=0.0, max_chars=100_000), log=None)
    meta = json.loads((out / "meta.json").read_text())
    counted = meta["report"]["skipped"]
    return {"planted": planted, "counted": counted, "planted_total": sum(planted.values()),
            "counted_total": sum(counted.values()), "all_reported": counted == planted,
            "good_documents_kept": meta["sources"][0]["documents"],
            "examples": [e.replace(str(work), "<work>") for e in meta["report"]["examples"][:5]]}


def hostile_files_campaign(baseline: Path, assets: Path, work: Path) -> dict:
    from tests.faults.hostile import absolute_paths, byte_entry_run, metadata_corpus, overwrite_case

    for name in ("hostile_metadata", "hostile_overwrite", "hostile_paths"):
        (work / name).mkdir(parents=True, exist_ok=True)
    out = {"metadata": metadata_corpus(baseline, work / "hostile_metadata"), "byte_entries": {}}
    for where in ("optim", "model"):
        marker = work / f"byte_{where}_ran"
        run = byte_entry_run(baseline, work / f"hostile_byte_{where}", where, marker)
        (run / "metrics.jsonl").unlink()
        r = launch(base_args(assets, run, "export.at_end=false"), run)
        out["byte_entries"][where] = {"rc": r.returncode, "refused": f"refusing checkpoint entry '{where}." in r.output,
                                      "ran": marker.exists()}
    out["overwrite"] = overwrite_case(baseline, work / "hostile_overwrite")
    out["absolute_paths"] = absolute_paths(baseline, assets, work / "hostile_paths")
    md, by = out["metadata"], out["byte_entries"].values()
    out["refused"] = (md["refused_export"] + md["refused_resume"] + sum(b["refused"] and not b["ran"] for b in by)
                      + out["overwrite"]["refused"] * out["overwrite"]["untouched"])
    out["cases"] = 2 * md["cases"] + len(out["byte_entries"]) + 1
    out["all_refused"] = (out["refused"] == out["cases"] and md["ran"] == 0 and not md["failures"]
                          and not out["absolute_paths"]["paths_found"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fault_report.json")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--corruptions", type=int, default=12)
    p.add_argument("--fuzz", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--machine", default="", help="free text recorded in the report (e.g. '2-core shared CPU')")
    p.add_argument("--only", choices=["hostile"], default=None, help="run one family alone")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="fault_campaign_"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.time() - started:7.0f}s] {msg}", flush=True)

    try:
        assets = make_assets(work / "assets")
        report = {"seed": args.seed, "machine": args.machine}
        save = lambda: Path(args.out).write_text(json.dumps(report, indent=1))  # noqa: E731 - partial reports
        if args.only == "hostile":
            report["hostile_files"] = h = hostile_files_campaign(reference_run(assets, work, 0, "ddp"), assets, work)
            report["summary"] = {"hostile_files_refused": f"{h['refused']}/{h['cases']}",
                                 "hostile_pickles": h["metadata"]["cases"], "wall_s": round(time.time() - started)}
            save()
            log(f"summary: {report['summary']}")
            return 0 if h["all_refused"] else 1
        report["bad_rows"] = bad_rows_campaign(assets, work)
        log(f"bad rows: {report['bad_rows']['counted_total']}/{report['bad_rows']['planted_total']} reported")
        save()
        baseline = reference_run(assets, work, 0, "ddp")
        report["corruptions"] = corruption_campaign(baseline, work, args.corruptions, rng, assets)
        log(f"corruptions: {report['corruptions']['detected']}/{report['corruptions']['injected']}")
        save()
        report["hostile_files"] = hostile = hostile_files_campaign(baseline, assets, work)
        log(f"hostile files: {hostile['refused']}/{hostile['cases']} refused")
        save()
        report["kills"] = kill_campaign(assets, work, args.kills, rng, log,
                                        on_chain=lambda k: (report.__setitem__("kills", k), save()))
        from tests.faults.test_config_fuzz import run_fuzz

        fuzz = run_fuzz(args.fuzz, seed=args.seed)
        report["fuzz"] = {"cases": fuzz["cases"], "clean_error": fuzz["clean_error"], "accepted": fuzz["accepted"],
                          "crashed_or_unnamed": len(fuzz["broken"]), "broken": [str(b) for b in fuzz["broken"][:10]]}
        log(f"fuzz: {report['fuzz']}")
        k = report["kills"]
        report["summary"] = {
            "kills_survived": f"{k['kills_survived']}/{k['kills_injected']}",
            "signals_clean_exit": f"{k['signals_clean_exit']}/{k['signals_injected']}",
            "steps_identical": f"{k['steps_identical']}/{k['steps_compared']}",
            "corruptions_detected": f"{report['corruptions']['detected']}/{report['corruptions']['injected']}",
            "bad_rows_reported": f"{report['bad_rows']['counted_total']}/{report['bad_rows']['planted_total']}",
            "hostile_files_refused": f"{hostile['refused']}/{hostile['cases']} "
                                     f"({hostile['metadata']['cases']} pickles x export + resume, 2 byte entries, "
                                     f"1 overwrite; {len(hostile['absolute_paths']['paths_found'])} absolute paths "
                                     f"in {hostile['absolute_paths']['files_checked']} exported files)",
            "fuzz_clean": f"{fuzz['clean_error'] + fuzz['accepted']}/{fuzz['cases']} "
                          f"({fuzz['clean_error']} clean errors naming the key, {fuzz['accepted']} accepted)",
            "wall_s": round(time.time() - started),
        }
        Path(args.out).write_text(json.dumps(report, indent=1))
        log(f"summary: {report['summary']}")
        ok = (k["kills_survived"] == k["kills_injected"] and k["steps_identical"] == k["steps_compared"]
              and report["corruptions"]["detected"] == report["corruptions"]["injected"] and not fuzz["broken"]
              and report["bad_rows"]["all_reported"] and hostile["all_refused"])
        return 0 if ok else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
