"""Data mixtures: get_config(arg) returns a data config (nested as config.data by the stages)."""
