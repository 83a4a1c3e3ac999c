"""mnist-jax: the Keras MNIST tutorial (MLP and CNN) as a pure-functional JAX/Flax/Optax
implementation.

The tutorial's steps map onto this API::

    import mnist_jax as mj

    ds = mj.load_dataset("mnist", "path/to/mnist")        # 60,000 / 10,000 uint8 digits
    x_train = mj.flatten_and_scale(ds.train_images)       # (60000, 784) in [0, 1]
    y_train = mj.to_categorical(ds.train_labels)          # one-hot (10 classes)
    print(mj.summary(mj.MLP()))                           # Dense 784 → Dropout 0.4 → ReLU → Dense 10
    result = mj.fit(mj.TrainConfig(epochs=100, batch_size=128), ds)   # Adam, cross-entropy
    # or any Flax module (a linen instance, or an NNX class: one model per seed) and
    # optax optimizer, several seeds in one program:
    # mj.fit(mj.TrainConfig(epochs=1, seeds=(0, 1)), ds, model=MyNet, optimizer=optax.adamw(2e-3))
    # or a named recipe, with checkpoints, logs and results in a run folder:
    # mj.train_run(mj.TrainConfig.from_recipe("speedrun"), "runs/speedrun")
    state = result.state
    print(mj.evaluate(state, ds.test_images, ds.test_labels))        # loss, accuracy
    print(mj.predict_classes(state, ds.test_images)[:30])
    # a run folder leaves Python as ONNX or StableHLO:
    # mj.export("runs/speedrun", format="onnx")
"""

from mnist_jax.augment import AugmentSpec
from mnist_jax.config import RECIPES, TrainConfig
from mnist_jax.data import (Dataset, flatten_and_scale, load_dataset, load_idx_folder, read_idx,
                            to_categorical, validation_split)
from mnist_jax.errors import DataError, MnistJaxError, UsageError
from mnist_jax.export import export
from mnist_jax.images import load_image, to_mnist
from mnist_jax.lifecycle import LoadedRun, RunOutcome, TrainingInterrupted, load_run, train_run
from mnist_jax.models import CNN, MLP, create_model
from mnist_jax.nnxmodel import NNXModel
from mnist_jax.run import (FitResult, TrainingDiverged, evaluate, fit, init_state, predict,
                           predict_classes, predict_images)
from mnist_jax.summary import count_params, summary
from mnist_jax.training import CrossEntropy, TrainState, make_optimizer, unstack_state
from mnist_jax.xla_cache import enable_compilation_cache

__version__ = "0.1.0"

# What a user calls: the tutorial's steps, the run's life (train, load, export), the models
# and their configuration, the results' types and the errors. The compiled pieces
# (train_step, train_epoch, create_train_state, stack_states, StepOptions, ...) stay in
# their modules: they change with the implementation.
__all__ = [
    # data
    "Dataset", "load_dataset", "load_idx_folder", "read_idx", "flatten_and_scale",
    "to_categorical", "validation_split", "load_image", "to_mnist",
    # models and configuration
    "MLP", "CNN", "create_model", "NNXModel", "TrainConfig", "RECIPES", "AugmentSpec",
    "CrossEntropy", "make_optimizer", "summary", "count_params",
    # training, in memory or in a run folder
    "fit", "FitResult", "init_state", "TrainState", "unstack_state", "train_run", "RunOutcome",
    "load_run", "LoadedRun", "enable_compilation_cache",
    # using a trained model
    "evaluate", "predict", "predict_classes", "predict_images", "export",
    # errors
    "MnistJaxError", "DataError", "UsageError", "TrainingDiverged", "TrainingInterrupted",
]
