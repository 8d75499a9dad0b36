/*
 * Compile-time checks of include/nativemem.h, built as C11 and as C++17 by scripts/test.sh
 * (suite c-header): the header is self-contained, valid in both languages, and its layout is the
 * one the Rust side (native/sys, test layout_matches_the_header) fills in. A field added in the
 * middle of a struct, or a reordering, fails here before it can break an engine.
 */
#include "nativemem.h"

#include <stddef.h>

#ifdef __cplusplus
#define NM_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define NM_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

NM_STATIC_ASSERT(NM_ABI_VERSION == 1u, "this check describes ABI version 1");
NM_STATIC_ASSERT(NM_DEFAULT_RESERVATION_QUANTUM == 1048576u, "the default quantum, as nativemem-sys's");
NM_STATIC_ASSERT(sizeof(void *) == 8, "the shipped targets are 64-bit");

NM_STATIC_ASSERT(sizeof(nm_spiller_vtable) == 40, "nm_spiller_vtable size");
NM_STATIC_ASSERT(offsetof(nm_spiller_vtable, ctx) == 8, "nm_spiller_vtable.ctx");
NM_STATIC_ASSERT(offsetof(nm_spiller_vtable, drop) == 32, "nm_spiller_vtable.drop");
NM_STATIC_ASSERT(sizeof(nm_listener) == 40, "nm_listener size");
NM_STATIC_ASSERT(sizeof(nm_manager_stats) == 40, "nm_manager_stats size");
NM_STATIC_ASSERT(sizeof(nm_pool_stats) == 24, "nm_pool_stats size");
NM_STATIC_ASSERT(sizeof(nm_manager_options) == 40, "nm_manager_options size");
NM_STATIC_ASSERT(offsetof(nm_manager_options, reservation_block) == 8,
                 "nm_manager_options.reservation_block");
NM_STATIC_ASSERT(offsetof(nm_manager_options, task_limit) == 16, "nm_manager_options.task_limit");
NM_STATIC_ASSERT(offsetof(nm_manager_options, reservation_quantum) == 24,
                 "nm_manager_options.reservation_quantum");
NM_STATIC_ASSERT(offsetof(nm_manager_options, close_timeout_millis) == 32,
                 "nm_manager_options.close_timeout_millis");

NM_STATIC_ASSERT(offsetof(nm_api, abi_version) == 0, "abi_version first");
NM_STATIC_ASSERT(offsetof(nm_api, struct_size) == 4, "struct_size second");
NM_STATIC_ASSERT(offsetof(nm_api, free_message) == 8, "free_message");
NM_STATIC_ASSERT(offsetof(nm_api, acquire) == 16, "acquire");
NM_STATIC_ASSERT(offsetof(nm_api, pool_open) == 48, "pool_open");
NM_STATIC_ASSERT(offsetof(nm_api, reservation_new) == 72, "reservation_new");
NM_STATIC_ASSERT(offsetof(nm_api, allocate) == 128, "allocate");
NM_STATIC_ASSERT(offsetof(nm_api, spiller_register) == 144, "spiller_register");
NM_STATIC_ASSERT(offsetof(nm_api, attach) == 160, "attach");
NM_STATIC_ASSERT(offsetof(nm_api, manager_create) == 176, "manager_create");
NM_STATIC_ASSERT(offsetof(nm_api, manager_close) == 184, "manager_close");
NM_STATIC_ASSERT(offsetof(nm_api, manager_spill) == 192, "manager_spill");
NM_STATIC_ASSERT(offsetof(nm_api, manager_reclaim) == 200, "manager_reclaim");
NM_STATIC_ASSERT(NM_API_V1_SIZE == 208, "version 1's first table: 208 bytes, as always");
NM_STATIC_ASSERT(offsetof(nm_api, reservation_force_grow) == NM_API_V1_SIZE,
                 "forced charges appended after version 1's first table");
NM_STATIC_ASSERT(offsetof(nm_api, reservation_force_shrink) == 216, "reservation_force_shrink");
NM_STATIC_ASSERT(offsetof(nm_api, manager_create_with) == 224,
                 "manager_create_with appended after the forced charges (224 bytes)");
NM_STATIC_ASSERT(offsetof(nm_api, trim_hook_register) == 232,
                 "trim hooks appended after manager_create_with (232 bytes)");
NM_STATIC_ASSERT(offsetof(nm_api, trim_hook_unregister) == 240, "trim_hook_unregister");
NM_STATIC_ASSERT(offsetof(nm_api, reservation_peak) == 248,
                 "reservation_peak appended after the trim hooks (248 bytes)");
NM_STATIC_ASSERT(offsetof(nm_api, pool_spill_written) == 256,
                 "pool_spill_written appended after reservation_peak (256 bytes)");
NM_STATIC_ASSERT(offsetof(nm_api, manager_cover_overcommit) == 264,
                 "manager_cover_overcommit appended after pool_spill_written (264 bytes)");
NM_STATIC_ASSERT(sizeof(nm_api) == 272, "nm_api size: 272 bytes");

/* The status codes are part of the ABI: never renumbered. */
NM_STATIC_ASSERT(NM_OK == 0 && NM_ERR_INVALID_ARGUMENT == 1 && NM_ERR_STALE_HANDLE == 2 &&
                     NM_ERR_INVALID_HANDLE == 3 && NM_ERR_CLOSED == 4 && NM_ERR_OUT_OF_MEMORY == 5 &&
                     NM_ERR_UNKNOWN_POINTER == 6 && NM_ERR_LISTENER == 7 && NM_ERR_SPILL == 8 &&
                     NM_ERR_UNSUPPORTED == 9 && NM_ERR_TIMEOUT == 10 && NM_ERR_INTERNAL == 11,
                 "status codes");

/* nm_api_check refuses a NULL table (an inline function of the header: it must compile). */
int nm_header_check_null_table(void) { return nm_api_check(NULL) == NM_ERR_UNSUPPORTED; }

/* NM_API_HAS tells the first table from one with the forced charges, that one from one with
 * manager_create_with, and that one from the whole table (the trim hooks). */
int nm_header_check_has(void) {
    nm_api t;
    t.struct_size = NM_API_V1_SIZE;
    int old_lacks = !NM_API_HAS(&t, reservation_force_grow);
    t.struct_size = NM_API_V1_SIZE + 16;
    int v1_lacks = NM_API_HAS(&t, reservation_force_shrink) && !NM_API_HAS(&t, manager_create_with);
    t.struct_size = (uint32_t)sizeof(nm_api);
    int options_only = (t.struct_size = 232, NM_API_HAS(&t, manager_create_with) &&
                                                   !NM_API_HAS(&t, trim_hook_register));
    int trim_only = (t.struct_size = 248, NM_API_HAS(&t, trim_hook_unregister) &&
                                              !NM_API_HAS(&t, reservation_peak));
    int spill_written_only = (t.struct_size = 264, NM_API_HAS(&t, pool_spill_written) &&
                                                       !NM_API_HAS(&t, manager_cover_overcommit));
    t.struct_size = (uint32_t)sizeof(nm_api);
    return old_lacks && v1_lacks && options_only && trim_only && spill_written_only &&
           NM_API_HAS(&t, reservation_peak) &&
           NM_API_HAS(&t, pool_spill_written) && NM_API_HAS(&t, manager_cover_overcommit) &&
           NM_API_HAS(&t, manager_reclaim);
}

/* The defaults of nm_manager_options (an inline function of the header: it must compile). */
int nm_header_check_options(void) {
    nm_manager_options o = nm_manager_options_default();
    return o.struct_size == sizeof(nm_manager_options) && o.task_limit == -1 &&
           o.close_timeout_millis == -1 && o.reservation_block == 0 &&
           o.reservation_quantum == NM_DEFAULT_RESERVATION_QUANTUM;
}
