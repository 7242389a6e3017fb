from tests import test_faults as tf
def test_small(prepared_dir, tmp_path):
  spec = dict(devices=2, steps=6, kills=3, seed=0)
  ref = tf._reference(prepared_dir, tmp_path, spec)
  tf._kill_loop(prepared_dir, tmp_path, spec, ref)
