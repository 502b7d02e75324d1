"""fedprobe beside Apple's pfl, updates per CPU-second (issue 19 point 2: ">= 0.8x pfl's updates per CPU-second at
100 clients per round").

Both sides train the quickstart's tiny ViT on the same digits partitions (fedprobe's ``fl.data.load_federated``, IID),
with plain SGD at the quickstart's lr 0.1, 1 local epoch, batch 16, FedAvg weighted by examples, no DP and no attack,
and evaluate centrally with the same function (``fl.training.evaluate`` on the same test split) before round 1 and
after every round. fedprobe runs as ``bench_overhead.py`` runs it (Flower's simulation engine on Ray, MLflow store
made before the timed window). pfl 0.6.0 runs its own in-process ``SimulatedBackend`` (one process, one model,
no messages), with ``FederatedAveraging`` and a central SGD step of lr 1 on the averaged update, which is FedAvg.

CPU is the whole process tree's (``psutil``: this process, Ray's daemons, the actors), read at the timed window's
ends and at every central evaluation; "rounds 2-R" starts at round 1's evaluation (actors warm). Runs are
interleaved (pfl, fedprobe, then fedprobe, pfl, ...); each pair gives one ratio; the table reports medians.

pfl needs a folder of its own (its pins clash with fedprobe's: dp-accounting < 0.6), never ``.venv``::

    make bench-pfl   # .venv/bin/python -m pip install -q --no-deps --target .bench-pfl pfl==0.6.0 prv-accountant==0.2.0
    PYTHONPATH=.bench-pfl .venv/bin/python benchmarks/bench_vs_pfl.py [--clients 100] [--per-round 100] \\
        [--rounds 5] [--repeats 3]

The last line is ``fedprobe/pfl updates per CPU-s ratio: <ratio>`` (rounds 2-R, where neither side pays start-up).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_overhead as bo  # noqa: E402  (sets Flower's and MLflow's environment first)
import torch  # noqa: E402

from defenses.randomness import SECRET_ENV, new_secret  # noqa: E402
from fl.config import Config  # noqa: E402
from models.tasks import logits_of, per_example_loss  # noqa: E402


class PflModule(torch.nn.Module):
    """fedprobe's model with the ``loss`` and ``metrics`` methods pfl's ``PyTorchModel`` calls."""

    def __init__(self, model: torch.nn.Module, task: Any) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, H, W] -> logits [B, K]
        return logits_of(self.model, {"pixel_values": x}, self.task)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        self.train(not eval)
        return per_example_loss(self(x), y, self.task).mean()

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:  # noqa: A002
        from pfl.metrics import Weighted

        self.eval()
        return {"loss": Weighted(float(per_example_loss(self(x), y, self.task).sum()), len(y))}


def run_pfl(cfg: Config) -> dict[str, tuple[float, float]]:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    from fl.data import load_federated
    from models import build_model, task_for

    fed = cfg.federation

    def body() -> None:
        data = load_federated(cfg.data, fed.num_clients, cfg.experiment.seed)
        task = task_for(cfg.model, data.task)
        net = PflModule(build_model(cfg.model, task, seed=cfg.experiment.seed), task)
        users: dict[int, list[torch.Tensor]] = {}
        for pid in range(fed.num_clients):
            train, _ = data.partition(pid)
            batch = data.collate([train[i] for i in range(len(train))])
            users[pid] = [batch["pixel_values"], batch["labels"]]

        class CentralEval(TrainingProcessCallback):  # the same evaluation and marks as both other sides
            def on_train_begin(self, *, model: Any) -> Metrics:
                bo._marking_evaluate(net.model, data.test, task, data.collate)
                return Metrics()

            def after_central_iteration(self, aggregate_metrics: Any, model: Any, *,
                                        central_iteration: int) -> tuple[bool, Metrics]:
                bo._marking_evaluate(net.model, data.test, task, data.collate)
                return False, Metrics()

        train_data = FederatedDataset(lambda uid: Dataset(users[uid], user_id=str(uid)),
                                      get_user_sampler("minimize_reuse", list(users)))
        backend = SimulatedBackend(training_data=train_data, val_data=train_data,
                                   postprocessors=[WeightByDatapoints()])
        params = [p for p in net.parameters() if p.requires_grad]
        model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                             central_optimizer=torch.optim.SGD(params, lr=1.0))
        FederatedAveraging().run(
            algorithm_params=NNAlgorithmParams(central_num_iterations=fed.rounds, evaluation_frequency=fed.rounds + 1,
                                               train_cohort_size=fed.clients_per_round, val_cohort_size=0),
            backend=backend, model=model,
            model_train_params=NNTrainHyperParams(local_learning_rate=cfg.optimizer.lr,
                                                  local_num_epochs=fed.local_epochs, local_batch_size=fed.batch_size),
            callbacks=[CentralEval()], send_metrics_to_platform=False)  # no per-round metrics printout

    return bo._timed(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=None, help="clients per round (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pfl / fedprobe pairs")
    ap.add_argument("--supernodes", type=int, default=0,
                    help="fedprobe's federation.supernodes (0: one SuperNode per client); N packs them on N")
    args = ap.parse_args()
    try:
        import pfl  # noqa: F401
    except ImportError:
        sys.exit("bench_vs_pfl: pfl is not importable; install it into its own folder and put that first on the "
                 "path (see --help): PYTHONPATH=.bench-pfl")
    per_round = args.per_round or args.clients
    os.environ.setdefault(SECRET_ENV, new_secret())
    torch.set_num_threads(1)  # what each of fedprobe's Ray actors gets (client_cpus = 1)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        bo.create_store(uri)
        cfg = bo.make_config("nodp", args.clients, per_round, args.rounds, tmp, args.supernodes)
        for rep in range(args.repeats):
            got = {}
            for side in (("pfl", "fedprobe") if rep % 2 == 0 else ("fedprobe", "pfl")):
                start = time.perf_counter()
                got[side] = run_pfl(cfg) if side == "pfl" else bo.run_fedprobe(cfg, uri)
                run, steady = got[side]["run"], got[side]["steady"]
                print(f"  pair {rep + 1}: {side:8s} run wall {run[0]:6.2f} s cpu {run[1]:6.2f} s | "
                      f"rounds 2-{args.rounds} wall {steady[0]:6.2f} s cpu {steady[1]:6.2f} s "
                      f"({time.perf_counter() - start:.0f} s with start-up)", flush=True)
            pairs.append(got)
    print(f"\n{datetime.date.today()}, {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {args.clients} clients, {per_round} per round, {args.rounds} rounds, {args.repeats} "
          "interleaved pairs" + (f", fedprobe on {args.supernodes} SuperNodes" if args.supernodes else "")
          + "; medians (ratios: median of per-pair ratios)")
    print("| window | pfl updates/s | fedprobe updates/s | ratio (wall) | pfl updates/CPU-s | fedprobe updates/CPU-s "
          "| ratio (CPU) |")
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for window, n in (("run", per_round * args.rounds), ("steady", per_round * (args.rounds - 1))):
        def med(side: str, i: int) -> float:
            return statistics.median(n / p[side][window][i] for p in pairs)

        def ratio(i: int) -> float:
            return statistics.median(p["pfl"][window][i] / p["fedprobe"][window][i] for p in pairs)

        ratios[window] = ratio(1)
        label = "whole run" if window == "run" else f"rounds 2-{args.rounds}"
        print(f"| {label} | {med('pfl', 0):.2f} | {med('fedprobe', 0):.2f} | {ratio(0):.3f} | {med('pfl', 1):.2f} "
              f"| {med('fedprobe', 1):.2f} | {ratio(1):.3f} |")
    print(f"fedprobe/pfl updates per CPU-s ratio: {ratios['steady']:.3f}")


if __name__ == "__main__":
    main()
