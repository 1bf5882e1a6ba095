"""bench/gpu_queue.sh: jobs share a machine's cards without ever sharing a card, in file order."""
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_jobs_get_their_own_cards_run_together_and_failures_count(tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def job(name: str, gpus: int, seconds: float, status: int = 0) -> str:
        record = f"{out}/{name}"
        return (f"{gpus} echo $CUDA_VISIBLE_DEVICES $MASTER_PORT > {record}; date +%s.%N >> {record}; "
                f"sleep {seconds}; date +%s.%N >> {record}; exit {status}")

    jobs = tmp_path / "jobs.txt"
    jobs.write_text("\n".join([
        "# two-card run beside two one-card runs, then one that needs every card",
        job("a", 2, 1.0), job("b", 1, 0.5), "", job("c", 1, 1.5),
        job("d", 4, 0.2), job("e", 1, 0.2, status=3)]) + "\n")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_queue.sh"), str(jobs), str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=60, env={"GPU_COUNT": "4", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr  # one job failed
    runs = {}
    for name, need in (("a", 2), ("b", 1), ("c", 1), ("d", 4), ("e", 1)):
        cards_port, start, end = (out / name).read_text().split("\n")[:3]
        cards, port = cards_port.split()
        cards = [int(c) for c in cards.split(",")]
        assert len(set(cards)) == need and all(0 <= c < 4 for c in cards)
        runs[name] = (set(cards), float(start), float(end), int(port))
    assert len({r[3] for r in runs.values()}) == 5  # a port each
    for x in runs:
        for y in runs:
            if x < y and runs[x][0] & runs[y][0]:  # a shared card: never at the same time
                assert runs[x][2] <= runs[y][1] or runs[y][2] <= runs[x][1], (x, y)
    assert runs["b"][1] < runs["a"][2] and runs["c"][1] < runs["a"][2]  # a, b, c ran together
    assert runs["d"][1] >= max(runs[k][2] for k in "abc")  # d waited for every card
    assert runs["e"][1] >= runs["d"][2]  # file order: e did not jump ahead of d
    assert (tmp_path / "logs" / "job7.log").exists() and "5 jobs, 1 failed" in proc.stdout


def test_a_job_needing_more_cards_than_the_machine_has_is_refused(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("1 true\n8 true\n")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_queue.sh"), str(jobs), str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=60, env={"GPU_COUNT": "4", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "line 2: needs 1 to 4 GPUs" in proc.stderr
