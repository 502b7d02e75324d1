"""The names fedprobe's ClientApp and ServerApp agree on in their messages (the bottom floor of ``fl``).

Kept apart from both apps so that the server side (``fl.server_hook``) does not import the ClientApp
module to learn them.
"""

CONFIG_KEY = "fedprobe-config"  # train config: the resolved experiment config (JSON)
STATE_KEY = "fedprobe-client-state"  # context.state: the client's defense state across rounds
RESTORE_KEY = "fedprobe-restore-state"  # train config: the server's copy of this client's ledger, after --resume
REPORT_KEY = "privacy-state"  # reply meta: the client's accounting state, reported every round
