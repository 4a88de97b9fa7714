"""The model loader of `hybrid-lm serve`, in a module of its own: transformers' server loads each model in a fresh
Python process, which unpickles this loader and so imports this module; the loader registers the package there before
it loads anything."""

from transformers.cli.serving.model_manager import ModelLoader


class HybridLmModelLoader(ModelLoader):
    """transformers serve's loader, which first registers this package's classes in the model's process. The model is
    then built from the installed package, as in the server's own process: no code from the folder runs. Every model
    it loads, the hybrid or a GPT-2 baseline, is prepared for the OpenAI API (`training.serve.prepare_for_serving`)."""

    def load_model_and_processor(self, model_id: str, on_progress=None):
        import os

        from training.serve import make_classes_available

        make_classes_available()
        # No hub kernels (see training.model_files.LOCAL_CODE_ONLY), for the GPT-2 baselines' transformers class too;
        # a USE_HUB_KERNELS the user set stays.
        os.environ.setdefault("USE_HUB_KERNELS", "NO")
        return super().load_model_and_processor(model_id, on_progress)

    def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
        from training.serve import prepare_for_serving

        return prepare_for_serving(super()._load_model(model_id, tqdm_class, progress_callback))
