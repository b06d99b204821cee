"""Whether qtool may reach the network: only when the user names a hub id or dataset that is not on
disk, and never when one of the usual offline switches is set."""

import os

OFFLINE_SWITCHES = ("QTOOL_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def network_allowed() -> bool:
    return not any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_SWITCHES)
