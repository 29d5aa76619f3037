"""The cluster edge of gppy-stage: the Argo night workflow (rendered from Hera), the manifest
checks, the watcher that submits a night once its folder stops growing, and backlog submission."""
