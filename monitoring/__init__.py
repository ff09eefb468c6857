"""Monitoring for mrl-serve: Prometheus config and rules, Grafana dashboard, and helpers to run them."""
