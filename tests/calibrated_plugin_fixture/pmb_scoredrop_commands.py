"""The sub-commands this plug-in adds to ``pmbench`` (imported by ``pmbench --help``: keep it light)."""
PMBENCH_COMMANDS = [("scoredrop-info", "pmb_scoredrop_cli", "scoredrop plug-in: print the positions a checkpoint drops")]
