// A CUPTI injection library for scripts/kernel-timeline (GPU machine, CUDA toolkit with CUPTI):
// the driver loads it through CUDA_INJECTION64_PATH and calls InitializeInjection, which asks
// CUPTI for every kernel's GPU start and end (and, with $TIMELINE_API set, every driver call's host
// start and end). Records go to $TIMELINE_OUT, one a line:
//   K <start ns> <end ns> <kernel name> <grid x> <grid y> <stream id>
//   A <start ns> <end ns> <driver function>
// A development tool: the library never loads CUPTI.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

static FILE* timeline;

static void CUPTIAPI give_buffer(uint8_t** buffer, size_t* size, size_t* max_records) {
    *size = 8 << 20;
    *buffer = (uint8_t*)aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI take_buffer(CUcontext context, uint32_t stream, uint8_t* buffer, size_t size, size_t valid) {
    (void)context, (void)stream, (void)size;
    CUpti_Activity* record = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            const CUpti_ActivityKernel9* k = (const CUpti_ActivityKernel9*)record;
            fprintf(timeline, "K %llu %llu %s %d %d %u\n", (unsigned long long)k->start, (unsigned long long)k->end, k->name,
                    k->gridX, k->gridY, k->streamId);
        } else if (record->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
            const CUpti_ActivityAPI* a = (const CUpti_ActivityAPI*)record;
            const char* name = "?";
            cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
            fprintf(timeline, "A %llu %llu %s\n", (unsigned long long)a->start, (unsigned long long)a->end, name);
        }
    }
    free(buffer);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    fclose(timeline);
}

int InitializeInjection(void) {
    const char* path = getenv("TIMELINE_OUT");
    timeline = fopen(path ? path : "/tmp/timeline.txt", "w");
    if (timeline == NULL) return 0;
    cuptiActivityRegisterCallbacks(give_buffer, take_buffer);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    if (getenv("TIMELINE_API")) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
    atexit(finish);
    return 1;
}
