import os, sys, pathlib, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# ldmkit's user cache (model hashes) goes to a folder of this test run, not the user's ~/.cache;
# set in the environment so that CLI runs in child processes use it too
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ldmkit-test-cache-")
