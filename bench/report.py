"""The printed report: the table of rows, the ratios, and a verdict per target of the issue."""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from bench.common import WRK_THREADS, LoadResult, load_average

# the targets
MIN_VS_NAIVE = 3.0
MIN_VS_AIOKAFKA = 1.5
MIN_VS_SERIAL = 0.5
MAX_P99_MS = 50.0
MAX_RSS_GROWTH = 0.10
MAX_ALLOWLIST_SLOWDOWN = 0.05
MIN_TAGSYNC_EVENTS_S = 5000.0
MIN_TAGSYNC_SHARE_OF_LIMIT = 0.95  # requests to OneSignal, of the app's rate limit
# the spool on and Kafka healthy, against off, measured alternately in one run
MIN_SPOOL_RATIO = 0.9


Check = tuple[str, bool | None]

LABELS = {
    "bare": "1 HTTP ceiling (Starlette 204)",
    "kafka": "2 Kafka ceiling (kafka-python)",
    "java": "2b Kafka ceiling (Java client)",
    "client_kafka_python": "2c kafka-python, closed loop",
    "client_aiokafka": "2c aiokafka, closed loop",
    "naive": "3 naive (send().get() in pool)",
    "aiokafka": "3b aiokafka rival (send_and_wait)",
    "ours": "4 ours (whole path)",
    "traced": "4b ours, tracing on (OTLP)",
}


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The conditions of the run, then one line per row measured."""
    loads: dict[str, LoadResult] = results["loads"]
    print()
    print(
        f"loopback, wrk -t{WRK_THREADS} -c{args.connections} -d{args.duration:g}s after "
        f"{args.warmup:g}s warm-up, body {results['body_bytes']} B, "
        f"{args.workers} uvicorn worker(s) per HTTP target, "
        f"{os.cpu_count()} CPUs shared (absolute figures are noisy; read the ratios); "
        f"broker: {results.get('kafka', 'embedded mock')}; load average at start "
        f"{results.get('load', '?')}, now {load_average()}"
    )
    print(
        f"{'target':<34}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'peak RSS':>10}"
        f"{'CPU us/req':>12}"
    )
    for key, label in LABELS.items():
        r = loads.get(key)
        if r is None:
            continue
        errors = r.non_2xx + r.socket_errors
        cpu = r.notes.get("cpu_us", {}).get("total")
        print(
            f"{label:<34}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{errors:>8}"
            f"{r.peak_rss_mb:>8.1f}MB{'' if cpu is None else f'{cpu:>12.1f}'}"
        )
    if "kafka" in loads:
        k = loads["kafka"]
        print(
            f"  (kafka: {k.notes['value_bytes']} B values, {k.notes['window']} records "
            "outstanding at most; its latency is ack queueing, not a request's)"
        )
    if "java" in loads:
        j = loads["java"]
        print(
            f"  (java: ProducerPerformance, {j.notes['records']} records of "
            f"{j.notes['record_bytes']} B (our record's value + key + headers) in "
            f"{j.notes['seconds']:.1f}s, {' '.join(j.notes['producer_props'])}; pipelined "
            "async sends: a ceiling, not a rival that acknowledges each request)"
        )
    if "client_kafka_python" in loads:
        n = loads["client_kafka_python"].notes["in_flight"]
        print(
            f"  (2c: each client in a process of its own, at most {n} records in flight, a new "
            "one sent as one is acknowledged; CPU us per acknowledged record)"
        )
    if "ours" in loads:
        outcomes = loads["ours"].notes.get("outcomes", {})
        print(f"  (ours, by the gateway's own counters: {outcomes})")
        cpu = loads["ours"].notes.get("cpu_us")
        if cpu:
            print(
                f"  (CPU per request of ours: {cpu['total']:.1f} us = server process"
                f" {cpu['server']:.1f} + its children {cpu['children']:.1f} (the producer"
                " process); the server process is the one that must keep up with HTTP)"
            )
    print()


def rival_ratio(results: dict[str, Any], rival: str) -> tuple[float, str]:
    """ours / rival: with --rounds, the median of each round's ratio, and the range."""
    rounds = results.get("rounds", {})
    mine, theirs = rounds.get("ours", []), rounds.get(rival, [])
    if len(mine) > 1 and len(mine) == len(theirs):
        ratios = sorted(a.rps / b.rps for a, b in zip(mine, theirs, strict=True))
        median = statistics.median(ratios)
        return median, f" (median of {len(ratios)} rounds, {ratios[0]:.2f}-{ratios[-1]:.2f})"
    return results["loads"]["ours"].rps / results["loads"][rival].rps, ""


def ratio_checks(results: dict[str, Any]) -> list[Check]:
    """Ours against naive and the serial limit (recorded in ``results``), and the ceilings."""
    loads: dict[str, LoadResult] = results["loads"]
    checks: list[Check] = []
    ours = loads.get("ours")
    for rival, target in (("aiokafka", MIN_VS_AIOKAFKA), ("naive", MIN_VS_NAIVE)):
        if ours and rival in loads:
            ratio, spread = rival_ratio(results, rival)
            results[f"ratio_vs_{rival}"] = ratio
            checks.append(
                (f"ours / {rival} = {ratio:.2f}x{spread} (target >= {target}x)", ratio >= target)
            )
    if ours and "bare" in loads and "kafka" in loads:
        serial = 1 / (1 / loads["bare"].rps + 1 / loads["kafka"].rps)
        ratio = ours.rps / serial
        results["serial_limit"] = serial
        results["ratio_vs_serial"] = ratio
        checks.append(
            (
                f"ours / serial limit {serial:.0f} = {ratio:.0%} (target >= {MIN_VS_SERIAL:.0%})",
                ratio >= MIN_VS_SERIAL,
            )
        )
        print(
            f"ours / HTTP ceiling = {ours.rps / loads['bare'].rps:.0%}, "
            f"ours / Kafka ceiling = {ours.rps / loads['kafka'].rps:.0%}"
        )
    if ours and "traced" in loads:
        traced = loads["traced"]
        print(
            f"ours with tracing on / off = {traced.rps / ours.rps:.0%} of the requests/s, "
            f"p99 {traced.p99_ms:.1f} vs {ours.p99_ms:.1f} ms (off is the default)"
        )
    client_lines(loads)
    if ours and "java" in loads:
        print(f"ours / Java client's ceiling = {ours.rps / loads['java'].rps:.0%}")
    if "kafka" in loads and "java" in loads:
        print(f"kafka-python / Java client = {loads['kafka'].rps / loads['java'].rps:.0%}")
    return checks


def client_lines(loads: dict[str, LoadResult]) -> None:
    """Row 2c against the rows it explains: what kafka-python's cost per record leaves."""
    kp, ak = loads.get("client_kafka_python"), loads.get("client_aiokafka")
    if kp is None or ak is None:
        return
    kp_us, ak_us = kp.notes["cpu_us"]["total"], ak.notes["cpu_us"]["total"]
    print(
        f"kafka-python / aiokafka per acknowledged record: {kp_us / ak_us:.2f}x the CPU "
        f"({kp_us:.1f} vs {ak_us:.1f} us), {kp.rps / ak.rps:.2f}x the records/s at "
        f"{kp.notes['in_flight']} in flight"
    )
    rival = loads.get("aiokafka")
    if rival is not None:
        wanted = MIN_VS_AIOKAFKA * rival.rps
        print(
            f"at {MIN_VS_AIOKAFKA}x the aiokafka rival ({wanted:.0f} req/s) kafka-python alone "
            f"would use {wanted * kp_us / 1e6:.2f} of the {os.cpu_count()} cores and has to "
            f"reach {wanted / kp.rps:.0%} of its own closed-loop rate"
        )
    ours = loads.get("ours")
    cpu = ours.notes.get("cpu_us") if ours else None
    if cpu:
        print(
            f"ours' producer process: {cpu['children']:.1f} us per request, kafka-python alone "
            f"{kp_us:.1f}: the hand-over's share at that end is the difference"
        )


def ours_checks(ours: LoadResult, args: argparse.Namespace) -> list[Check]:
    """The p99 target (at 64 connections only) and no error answers or duplicates."""
    p99_ok = ours.p99_ms <= MAX_P99_MS if args.connections == 64 else None
    errors = ours.non_2xx + ours.socket_errors
    dup = ours.notes.get("outcomes", {}).get("duplicate", 0)
    return [
        (
            f"ours p99 {ours.p99_ms:.1f} ms at {args.connections} connections "
            f"(target <= {MAX_P99_MS:.0f} ms at 64)",
            p99_ok,
        ),
        (
            f"ours error responses {ours.non_2xx}, socket errors "
            f"{ours.socket_errors}, duplicates {dup:.0f} (target 0)",
            errors == 0 and dup == 0,
        ),
    ]


def soak_checks(s: dict[str, Any], args: argparse.Namespace) -> list[Check]:
    print(
        f"soak: {s['rps']:.0f} req/s (target {s['target_rps']}) for {args.soak:g}s, "
        f"p99 {s['p99_ms']:.1f} ms; RSS after warm-up {s['rss_after_warmup_mb']:.1f} MB, "
        f"peak {s['rss_peak_mb']:.1f}, end {s['rss_end_mb']:.1f}; "
        f"dedupe entries {s['outcomes'].get('dedupe_entries', 0):.0f}"
    )
    print(f"  RSS series (MB): {s['rss_series_mb']}")
    flat = s["growth"] <= MAX_RSS_GROWTH
    # a flat run shorter than the 5 minutes proves nothing either way
    soak_ok = flat if args.soak >= 300 or not flat else None
    return [
        (
            f"soak RSS peak {s['growth']:+.1%} over after-warm-up in {args.soak:g}s "
            f"(target within {MAX_RSS_GROWTH:.0%} over 300 s)",
            soak_ok,
        )
    ]


def tagsync_checks(t: dict[str, Any]) -> list[Check]:
    print(
        f"tag sync ({t['order']}): {t['events']} events, {t['users']} users, app limit "
        f"{t['app_rate_limit']:g}/s: {t['events_per_s']:.0f} events/s from the first "
        f"record read to all committed and delivered ({t['consuming_s']:.1f}s; "
        f"{t['events_per_s_from_first_patch']:.0f}/s from the first PATCH; "
        f"{t['events_per_s_from_launch']:.0f}/s counting process start and group join), "
        f"{t['requests']} requests at {t['requests_per_s']:.0f}/s "
        f"({t['events_per_request']:.1f} events each), statuses {t['statuses']}, "
        f"{t['users_with_final_tags']}/{t['users']} users with their final tags; "
        f"produced at {t['produce_records_per_s']:.0f} records/s in batches of up to "
        f"{t['produce_batch_size'] // 1024} KiB "
        f"({t['backlog_mb']:.0f} MB over {t['topics']} topics, {t['partitions']} partitions)"
    )
    return [
        (
            "tag sync: no offset committed ahead of its delivered update "
            f"(committed ahead: {t['committed_ahead_of_delivery']})",
            not t["committed_ahead_of_delivery"] and t["finished"],
        ),
        (
            f"tag sync {t['events_per_s']:.0f} events/s (target >= {MIN_TAGSYNC_EVENTS_S:.0f})",
            t["events_per_s"] >= MIN_TAGSYNC_EVENTS_S,
        ),
        (
            # the fake OneSignal answers 429 past the app's rate in any 1 s window, so no 429
            # means never above it; the rate is from the first request to the last, which
            # can pass the limit by a window's worth sent at once at the start
            f"tag sync requests at {t['requests_per_s']:.0f}/s from the first to the last ="
            f" {t['requests_per_s'] / t['app_rate_limit']:.0%} of the app limit"
            f" {t['app_rate_limit']:g}/s; over it in a 1 s window (429): "
            f"{t['statuses'].get('429', 0)} (target >= {MIN_TAGSYNC_SHARE_OF_LIMIT:.0%}, 0)",
            t["requests_per_s"] >= MIN_TAGSYNC_SHARE_OF_LIMIT * t["app_rate_limit"]
            and not t["statuses"].get("429", 0),
        ),
        (
            f"tag sync per-user 429s {t['user_limited_429']}, all final tags "
            f"{t['users_with_final_tags'] == t['users']} (target 0, True)",
            t["user_limited_429"] == 0 and t["users_with_final_tags"] == t["users"],
        ),
    ]


def allowlist_checks(a: dict[str, Any]) -> list[Check]:
    print(
        f"allowlist: {a['us_small']:.2f} µs/lookup with {a['ranges_small']} ranges, "
        f"{a['us_big']:.2f} µs with {a['prefixes_big']} prefixes in {a['scopes_big']} "
        f"scopes ({a['ranges_big']} merged ranges); cached sender address "
        f"{a['us_small_cached']:.2f} / {a['us_big_cached']:.2f} µs; "
        f"{a['mismatches_vs_ipset']} mismatches vs netaddr.IPSet"
    )
    return [
        (
            f"allowlist 1,100 vs 17 ranges: {a['ratio']:.3f}x (target within "
            f"{MAX_ALLOWLIST_SLOWDOWN:.0%})",
            a["ratio"] <= 1 + MAX_ALLOWLIST_SLOWDOWN,
        )
    ]


def print_profile(p: dict[str, Any]) -> None:
    print()
    if "error" in p:
        print(f"profile: {p['error']}")
        return
    print(
        f"profile of ours ({p['samples']} samples at "
        f"{p['rps_while_sampled']:.0f} req/s while sampled; raw stacks in {p['file']})"
    )
    print("  threads (% of samples): " + ", ".join(f"{t} {s}%" for t, s in p["threads"]))
    print(
        f"  CPU per request by stage ({p['cpu_us_per_request']:.0f} us of CPU per request, "
        "server and producer process, shared out by py-spy's samples):"
    )
    for stage, share, us in p["stages_us"]:
        print(f"    {stage:<14}{us:>8.1f} us {share:>6.1f}%")
    print("  top own time:")
    for frame, share in p["own"]:
        print(f"    {share:5.1f}%  {frame}")
    print("  top inclusive time:")
    for frame, share in p["inclusive"]:
        print(f"    {share:5.1f}%  {frame}")


def spool_checks(s: dict[str, Any]) -> list[Check]:
    from bench.spool import print_spool

    print_spool(s)
    ratio = s["healthy"]["ratio"]
    return [
        (
            f"spool on / off with Kafka healthy = {ratio:.2f} (target: within noise,"
            f" >= {MIN_SPOOL_RATIO})",
            ratio >= MIN_SPOOL_RATIO,
        ),
        (
            f"spooling: error responses {s['spooling']['non_2xx']} (target 0)",
            s["spooling"]["non_2xx"] == 0,
        ),
        (
            f"drain left {s['drain_one_key']['left'] + s['drain_many_keys']['left']:.0f}"
            " records (target 0)",
            s["drain_one_key"]["left"] + s["drain_many_keys"]["left"] == 0,
        ),
    ]


def report(results: dict[str, Any], args: argparse.Namespace) -> list[Check]:
    """Prints the table, each measurement's line and every check's verdict; returns the checks."""
    print_table(results, args)
    checks = ratio_checks(results)
    ours: LoadResult | None = results["loads"].get("ours")
    if ours:
        checks += ours_checks(ours, args)
    if results.get("spool"):
        checks += spool_checks(results["spool"])
    if results.get("soak"):
        checks += soak_checks(results["soak"], args)
    if results.get("tagsync"):
        checks += tagsync_checks(results["tagsync"])
    if results.get("allowlist"):
        checks += allowlist_checks(results["allowlist"])
    print()
    for text, ok in checks:
        print(f"[{verdict(ok)}] {text}")
    if ours and "profile" in ours.notes:
        print_profile(ours.notes["profile"])
    return checks
