"""auditapp: the ClientApp. Lines marked ``# fedprobe`` are the audit's; remove them and it is a plain Flower app."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from auditapp.task import Net, load_data, train as train_fn
from fl.audit import audit_mod, private_training  # fedprobe


def _settings(msg: Message, context: Context) -> dict:
    cfg = msg.content["config"]
    return {"lr": float(cfg["lr"]), "batch_size": int(cfg["batch-size"]), "epochs": int(cfg["local-epochs"]),
            "examples": int(cfg["examples-per-client"]), "dp_noise": float(cfg.get("dp-noise", 0.0)),
            "pid": int(context.node_config["partition-id"]), "n": int(context.node_config["num-partitions"])}


def facts(msg: Message, context: Context) -> dict:  # fedprobe: what the server's attack needs to know
    s = _settings(msg, context)
    return {"lr": s["lr"], "batch_size": s["batch_size"], "epochs": s["epochs"], "optimizer": "sgd", "momentum": 0.9}


def oracle(msg: Message, context: Context):  # fedprobe: simulation only, the examples this client trained on
    s = _settings(msg, context)
    trainloader, _ = load_data(s["pid"], s["n"], s["batch_size"], s["examples"])
    return trainloader.dataset.images, trainloader.dataset.labels


app = ClientApp(mods=[audit_mod(facts=facts, oracle=oracle)])  # fedprobe: mods=[...]


@app.train()
def train(msg: Message, context: Context) -> Message:
    s = _settings(msg, context)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = load_data(s["pid"], s["n"], s["batch_size"], s["examples"])
    optimizer = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9)
    metrics = {}
    if s["dp_noise"] > 0:  # fedprobe: DP-SGD around the same loop, epsilon composed over rounds
        with private_training(model, optimizer, trainloader, msg, context, noise_multiplier=s["dp_noise"],
                              epochs=s["epochs"]) as dp:
            loss = train_fn(dp.model, dp.loader, s["epochs"], s["lr"], "cpu", optimizer=dp.optimizer)
        metrics["epsilon"] = dp.epsilon
    else:
        loss = train_fn(model, trainloader, s["epochs"], s["lr"], "cpu", optimizer=optimizer)
    metrics.update({"train_loss": loss, "num-examples": len(trainloader.dataset)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
