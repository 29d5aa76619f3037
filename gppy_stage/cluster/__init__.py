"""The cluster edge of gppy-stage: the Argo night workflow (rendered from Hera), the watcher
that submits a night once its folder stops growing, and backlog submission. The manifest checks are
development tooling: tests/manifest_checks.py."""
