import pytest


@pytest.fixture(autouse=True)
def _restore_dtype_policy():
    """Training sets Keras' global dtype policy (bf16 on this CPU); later test modules in the
    same process must not inherit it."""
    import keras

    before = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(before)
