"""auditapp: the ServerApp. Lines marked ``# fedprobe`` are the audit's."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from auditapp.task import IMAGE_SHAPE, MEAN, NUM_CLASSES, STD, Net, load_data, test
from fl.audit import AuditStrategy, central_dp, image_task  # fedprobe

app = ServerApp()

DEFAULTS = {"num-server-rounds": 2, "fraction-train": 1.0, "lr": 0.05, "batch-size": 1, "local-epochs": 1,
            "examples-per-client": 2, "dp-noise": 0.0, "central-dp-noise": 0.0, "attack": "idlg", "attack-iterations": 40,
            "tracking-uri": "", "output-dir": "fedprobe-output"}


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    _, testloader = load_data(0, 1, 64, 1)
    loss, accuracy = test(model, testloader, "cpu")
    return MetricRecord({"accuracy": accuracy, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = {**DEFAULTS, **context.run_config}
    arrays = ArrayRecord(Net().state_dict())
    strategy = FedAvg(fraction_train=float(rc["fraction-train"]), fraction_evaluate=0.0)
    if float(rc["central-dp-noise"]) > 0:  # fedprobe: server-side DP around the same FedAvg
        nodes = len(list(grid.get_node_ids()))
        strategy = central_dp(strategy, num_clients=nodes, clients_per_round=int(nodes * float(rc["fraction-train"])),
                              noise_multiplier=float(rc["central-dp-noise"]), clipping_norm=1.0)
    strategy = AuditStrategy(  # fedprobe: wraps the strategy; everything below is unchanged
        strategy, attack=str(rc["attack"]), attack_params={"iterations": int(rc["attack-iterations"])}, model=Net,
        task=image_task(NUM_CLASSES, IMAGE_SHAPE, MEAN, STD), victims=[0], rounds=[1],
        tracking_uri=str(rc["tracking-uri"]), output_dir=str(rc["output-dir"]), experiment="auditapp")
    train_config = ConfigRecord({k: rc[k] for k in ("lr", "batch-size", "local-epochs", "examples-per-client",
                                                    "dp-noise")})
    result = strategy.start(grid=grid, initial_arrays=arrays, train_config=train_config,
                            num_rounds=int(rc["num-server-rounds"]), evaluate_fn=central_evaluate)
    print(f"auditapp: run {strategy.summary_dict['run_id']} {strategy.summary_dict['status']} "  # fedprobe
          f"accuracy {result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]['accuracy']:.3f}")
