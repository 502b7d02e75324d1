"""A Flower app in the shape of Flower's quickstart-pytorch template, audited by fedprobe (see the README)."""
