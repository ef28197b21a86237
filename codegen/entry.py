"""The native entry function: one exported TVM-FFI function that calls every kernel in order, so a run costs one
call from Python instead of one per kernel (TVM's AOT executor does the same).

`kiln_run(table[, stamps])` takes one uint8 tensor holding a DLTensor descriptor for every value of the plan
(inputs, outputs, blocks, constants), filled in by the runtime at load (and patched for zero-copy inputs), and
hands each kernel pointers into it. A kernel's non-zero return, its error already raised through TVM-FFI, stops the
run and reaches Python as an exception. The function keeps no state, so several models may share a library.

The optional second argument, an int64 tensor of len(steps) + 1, receives CLOCK_MONOTONIC nanoseconds before
the first kernel and after each one: per-kernel times *in sequence*, where a kernel finds its weights cold and
its input in the other core's cache. Timing a kernel alone, over and over, hides both (MobileNetV2 here: 2.2 ms
summed in isolation, 2.85 ms in sequence), so `kiln profile` reports both.
"""

from __future__ import annotations

from .pool import POOL_SOURCE

ENTRY_SYMBOL = "kiln_run"
DLTENSOR_BYTES = 48  # data, device, ndim, dtype, shape, strides, byte_offset on a 64-bit target


def entry_source(steps: list[dict], n_values: int) -> str:
    kernels = sorted({s["kernel"] for s in steps})
    lines = [POOL_SOURCE, "#include <tvm/ffi/c_api.h>", "#include <dlpack/dlpack.h>", "#include <time.h>", ""]
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
        "static DLTensor* as_tensor(const TVMFFIAny* a) {",
        "  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;",
        "  if (a->type_index == kTVMFFITensor) return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));",
        "  return 0;",
        "}",
        "",
        "static void stamp(int64_t* stamps, int k) {",
        "  struct timespec ts;",
        "  if (!stamps) return;",
        "  clock_gettime(CLOCK_MONOTONIC, &ts);",
        "  stamps[k] = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;",
        "}",
        "",
        f"int __tvm_ffi_{ENTRY_SYMBOL}(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {{",
        '  if (n != 1 && n != 2) return fail("kiln_run takes the value table and, optionally, a stamps tensor");',
        "  DLTensor* t = as_tensor(&args[0]);",
        '  if (!t) return fail("kiln_run: the value table must be a tensor");',
        f"  if (t->ndim != 1 || t->shape[0] != {n_values * DLTENSOR_BYTES})",
        '    return fail("kiln_run: the value table has the wrong size");',
        "  DLTensor* table = (DLTensor*)((char*)t->data + t->byte_offset);",
        "  int64_t* stamps = 0;",
        "  if (n == 2) {",
        "    DLTensor* st = as_tensor(&args[1]);",
        f"    if (!st || st->ndim != 1 || st->shape[0] != {len(steps) + 1} || st->dtype.code != kDLInt"
        + " || st->dtype.bits != 64)",
        f'      return fail("kiln_run: stamps must be an int64 tensor of {len(steps) + 1} (steps + 1)");',
        "    stamps = (int64_t*)((char*)st->data + st->byte_offset);",
        "  }",
        "  TVMFFIAny unused;",
        "  int rc;",
        "  stamp(stamps, 0);",
    ]
    for k, s in enumerate(steps, 1):
        args = ", ".join(f"T({i})" for i in s["args"])
        lines += ["  {", f"    TVMFFIAny a[{len(s['args'])}] = {{{args}}};", "    unused.type_index = 0;",
                  f"    kiln_loop_gcd = {int(s.get('loop_gcd', 0))};",
                  f"    rc = __tvm_ffi_{s['kernel']}(0, a, {len(s['args'])}, &unused);",
                  "    if (rc != 0) { kiln_loop_gcd = 0; return rc; }", f"    stamp(stamps, {k});", "  }"]
    lines += ["  kiln_loop_gcd = 0;  /* kernels called one by one (profiles) split as TVM does */",
              "  ret->type_index = 0;", "  return 0;", "}", ""]
    return "\n".join(lines)
