"""Adapters that run vtw_core inside other tools (lmms-eval). Each one imports its tool only when used."""
