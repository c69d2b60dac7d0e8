# Source on the device machine from the repo root: unpacks the runtime-only TVM bundle
# (.carry/site312.tgz, made as TVM_NOTES.md says) and puts tsedge on PYTHONPATH.
mkdir -p /tmp/site /tmp/pkg/tsedge
tar xzf .carry/site312.tgz -C /tmp/site
cp -r tsedge/. /tmp/pkg/tsedge/ && for d in models tir_kernels compile; do cp -r "$d" /tmp/pkg/tsedge/; done
export PYTHONPATH=/tmp/pkg:/tmp/site:$PWD/tests PYTHONUNBUFFERED=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
