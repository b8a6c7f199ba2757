"""HTTP service (``bentoml serve``) and batch script (``python -m serving.batch``) over model bundles."""
