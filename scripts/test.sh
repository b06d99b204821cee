#!/usr/bin/env bash
# Set up with the test dependencies and run the whole suite, slow real-model tests included.
EXTRAS="[dev]" source "$(dirname "$0")/setup.sh"
python -m pytest "$@"
