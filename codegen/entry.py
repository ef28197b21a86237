"""The native entry function: one exported TVM-FFI function that calls every kernel in order, so a run costs one
call from Python instead of one per kernel (TVM's AOT executor does the same).

`kiln_run(table)` takes one uint8 tensor holding a DLTensor descriptor for every value of the plan (inputs,
outputs, blocks, constants), filled in by the runtime at load (and patched for zero-copy inputs), and hands
each kernel pointers into it. A kernel's non-zero return, its error already raised through TVM-FFI, stops the
run and reaches Python as an exception. The function keeps no state, so several models may share a library.
"""

from __future__ import annotations

ENTRY_SYMBOL = "kiln_run"
DLTENSOR_BYTES = 48  # data, device, ndim, dtype, shape, strides, byte_offset on a 64-bit target


def entry_source(steps: list[dict], n_values: int) -> str:
    kernels = sorted({s["kernel"] for s in steps})
    lines = ["#include <tvm/ffi/c_api.h>", "#include <dlpack/dlpack.h>", ""]
    lines += [f"extern int __tvm_ffi_{k}(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);" for k in kernels]
    lines += [
        "",
        "static int fail(const char* message) {",
        "  const char* parts[1] = {message};",
        '  TVMFFIErrorSetRaisedFromCStrParts("ValueError", parts, 1);',
        "  return -1;",
        "}",
        "",
        "#define T(i) {.type_index = kTVMFFIDLTensorPtr, .v_ptr = &table[i]}",
        "",
        f"int __tvm_ffi_{ENTRY_SYMBOL}(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {{",
        '  if (n != 1) return fail("kiln_run takes one argument: the value table");',
        "  DLTensor* t;",
        "  if (args[0].type_index == kTVMFFIDLTensorPtr) t = (DLTensor*)args[0].v_ptr;",
        "  else if (args[0].type_index == kTVMFFITensor)",
        "    t = (DLTensor*)((char*)args[0].v_obj + sizeof(TVMFFIObject));",
        '  else return fail("kiln_run: the value table must be a tensor");',
        f"  if (t->ndim != 1 || t->shape[0] != {n_values * DLTENSOR_BYTES})",
        '    return fail("kiln_run: the value table has the wrong size");',
        "  DLTensor* table = (DLTensor*)((char*)t->data + t->byte_offset);",
        "  TVMFFIAny unused;",
        "  int rc;",
    ]
    for s in steps:
        args = ", ".join(f"T({i})" for i in s["args"])
        lines += ["  {", f"    TVMFFIAny a[{len(s['args'])}] = {{{args}}};", "    unused.type_index = 0;",
                  f"    rc = __tvm_ffi_{s['kernel']}(0, a, {len(s['args'])}, &unused);",
                  "    if (rc != 0) return rc;", "  }"]
    lines += ["  ret->type_index = 0;", "  return 0;", "}", ""]
    return "\n".join(lines)
