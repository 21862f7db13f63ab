#!/bin/sh
# The image's entrypoint. `docker run IMAGE run m.yaml` runs `pipeline-stage run m.yaml`; a command
# of its own runs as given: Kubernetes replaces the entrypoint with a pod's `command`, but
# kfp.local.DockerRunner hands a component's command (`sh -ec ...`) to the container as arguments.
case "$1" in
  sh | bash | python | python3 | /*) exec "$@" ;;
esac
exec pipeline-stage "$@"
