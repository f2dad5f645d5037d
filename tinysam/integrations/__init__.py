"""tinysam inside annotation tools: Label Studio (an ML backend), X-AnyLabeling (its SAM model
files) and CVAT (a serverless interactor and the browser's decoder)."""
