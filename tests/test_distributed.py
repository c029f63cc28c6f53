"""Distributed statistics: two CPU processes (gloo), each feeding half of the
calibration batches, merge to the same model as one process on all batches.

The workers run in subprocesses (one thread each) with a free localhost port;
every case is merged in the same pair of processes to pay the start-up once.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import autoalign

WORLD = 2
N_BATCHES = 4

#: (case name, aligner, with BatchNorm). The models use tanh: with ReLU, units dead on the
#: calibration data give exactly zero canonical correlations, whose pairing CCA leaves
#: arbitrary, so float-rounding differences of the sums can pick another one.
#: Cases ending in "_f32" use float32 models, the others float64 models: float32 features get
#: float32 products (relative error ~1e-7, shifted by each process's own first batch mean),
#: so only float64 models can be held to 1e-6; float32 ones are held to 1e-4, which still
#: catches any statistic that is not all-reduced (that changes the merge by > 1e-2).
CASES = [("cca", "cca", False), ("permutation", "permutation", False), ("permutation_bn", "permutation", True), ("cca_bn", "cca", True),
         ("cca_repair", "cca", False), ("permutation_bn_repair", "permutation", True), ("cca_bn_f32", "cca", True),
         ("cca_bn_repair_sharded", "cca", True), ("permutation_best_sharded", "permutation", False), ("permutation_best", "permutation", False)]
#: Cases ending in "_sharded" pass the whole data on every process with ``shard=True`` (the
#: calibration reads its share); "_best" ones choose the reference by calibration loss, which
#: every process must agree on.

_COMMON = textwrap.dedent(
    """
    import torch
    from torch import nn

    def dtype_of(case):
        return torch.float32 if case.endswith("_f32") else torch.float64

    def make_model(seed, bn, dtype=torch.float64):
        torch.manual_seed(seed)
        layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)]
        return nn.Sequential(*layers).to(dtype)

    def make_data(dtype=torch.float64):
        g = torch.Generator().manual_seed(123)
        return [torch.randn(48, 6, generator=g).to(dtype) for _ in range(N_BATCHES)]

    def labelled(data, case, models):
        # "_best" cases need (input, target) batches: even batches are labelled by model 0's
        # predictions, odd ones by model 1's, so each process's shard alone would choose
        # another reference
        if "_best" not in case:
            return data
        with torch.no_grad():
            return [(x, models[i % 2](x).argmax(1)) for i, x in enumerate(data)]

    def options_of(case):
        return {"repair": "repair" if "_repair" in case else "auto", "reference": "best" if "_best" in case else 0}
    """
)

_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    import autoalign

    rank, out_dir = int(os.environ["RANK"]), sys.argv[1]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["MASTER_PORT"], rank=rank, world_size=WORLD)
    try:
        for case, aligner, bn in CASES:
            sharded = case.endswith("_sharded")
            models = [make_model(s, bn, dtype_of(case)) for s in range(3)]
            batches = labelled(make_data(dtype_of(case)), case, models)
            batches = batches if sharded else batches[rank::WORLD]
            merged = autoalign.merge(models, batches, aligner=aligner, shard=sharded, **options_of(case))
            torch.save(merged.state_dict(), os.path.join(out_dir, f"{case}_{rank}.pt"))
    finally:
        dist.destroy_process_group()
    """
)

exec(_COMMON, globals())  # make_model, make_data: the same definitions as the workers'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    script = out / "worker.py"
    script.write_text(f"WORLD = {WORLD}\nN_BATCHES = {N_BATCHES}\nCASES = {CASES!r}\n" + _COMMON + _WORKER)
    env = dict(os.environ, MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(out)], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return {(case, r): torch.load(out / f"{case}_{r}.pt") for case, _, _ in CASES for r in range(WORLD)}


PARAMS = CASES


@pytest.mark.parametrize("case, aligner, bn", PARAMS)
def test_two_processes_merge_like_one_process_on_all_data(distributed_results, case, aligner, bn):
    dtype = dtype_of(case)
    models = [make_model(s, bn, dtype) for s in range(3)]
    single = autoalign.merge(models, labelled(make_data(dtype), case, models), aligner=aligner, **options_of(case)).state_dict()
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    for r in range(WORLD):
        got = distributed_results[(case, r)]
        assert got.keys() == single.keys()
        for k, v in single.items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k], v, rtol=tol, atol=tol * float(v.abs().max()) + 1e-12, msg=f"rank {r}: {k}")
            else:
                assert torch.equal(got[k], v), (r, k)  # e.g. num_batches_tracked: all batches of all processes
    # every process ends with the same model
    for k in single:
        assert torch.equal(distributed_results[(case, 0)][k], distributed_results[(case, 1)][k]), k


def test_statistics_helpers_are_no_ops_without_torch_distributed():
    net = nn.BatchNorm1d(3)
    net.running_mean.fill_(2.0)
    assert autoalign.distributed.sync_batchnorm_stats(net) is net and float(net.running_mean[0]) == 2.0
    acc = {"x": [5, torch.ones(2), torch.ones(2)]}
    autoalign.distributed.all_reduce_moments(acc)
    assert acc["x"][0] == 5


def test_a_sharded_calibration_reads_its_share_of_the_limited_batches(monkeypatch):
    import autoalign.calibration as calibration

    batches = [torch.full((2, 3), float(i)) for i in range(7)]
    monkeypatch.setattr(calibration, "rank_and_world", lambda: (1, 2))
    mine = [int(b[0, 0]) for b in autoalign.Calibration(batches, num_batches=5, shard=True).batches()]
    assert mine == [1, 3]  # batches 0..4 (the limit applies to the whole), every second one from 1
    assert [int(b[0, 0]) for b in autoalign.Calibration(batches, num_batches=5).batches()] == [0, 1, 2, 3, 4]
