"""Registers an ONNX file as a new version of a registered model in an MLflow
tracking server, as a training pipeline would, for tests/mlflow_e2e.rs:

    register.py URI NAME MODEL_FILE ACCURACY [--sha256 HEX] [--alias ALIAS] [--stage STAGE]
    register.py URI NAME --move ALIAS --to VERSION

The run logs the accuracy metric, two parameters and the file under the run's
artifacts at model/model.onnx; the version is created from them (tagged with the
file's SHA-256, or with --sha256's), the alias, if given, set to it and the version
moved to the (legacy) stage, if given. Prints the version and the run id as JSON.
With --move, only the alias is moved to an existing version (a rollback).
"""

import argparse
import hashlib
import json

import mlflow
from mlflow import MlflowClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("name")
    parser.add_argument("model_file", nargs="?")
    parser.add_argument("accuracy", type=float, nargs="?")
    parser.add_argument("--sha256")
    parser.add_argument("--alias")
    parser.add_argument("--stage")
    parser.add_argument("--move")
    parser.add_argument("--to")
    args = parser.parse_args()

    mlflow.set_tracking_uri(args.uri)
    client = MlflowClient()
    if args.move:
        client.set_registered_model_alias(args.name, args.move, args.to)
        print(json.dumps({"version": args.to, "run_id": ""}))
        return
    if not client.search_registered_models(filter_string=f"name = '{args.name}'"):
        client.create_registered_model(args.name)
    mlflow.set_experiment(f"{args.name}-training")
    with open(args.model_file, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    with mlflow.start_run() as run:
        mlflow.log_metric("accuracy", args.accuracy)
        mlflow.log_params({"lr": 0.3, "optimizer": "sgd"})
        mlflow.log_artifact(args.model_file, artifact_path="model")
        version = client.create_model_version(
            args.name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags={"sha256": args.sha256 or sha256, "semver": "1.0.0"},
        )
    if args.alias:
        client.set_registered_model_alias(args.name, args.alias, version.version)
    if args.stage:
        client.transition_model_version_stage(args.name, version.version, args.stage)
    print(json.dumps({"version": version.version, "run_id": run.info.run_id}))


if __name__ == "__main__":
    main()
