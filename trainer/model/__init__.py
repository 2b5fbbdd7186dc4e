from trainer.model.t3d import T3D, build_model

__all__ = ["T3D", "build_model"]
