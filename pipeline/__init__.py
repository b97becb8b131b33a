"""sluice: a Linux egress firewall built as a pipeline of ZeroMQ stages."""

__version__ = "0.1.0"
