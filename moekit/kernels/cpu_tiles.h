/* The micro-kernels' dispatch on the rows of a tile, for the blocked kernels (cpu_blocks.c,
 * cpu_blocks_bf16.c). Include after defining MR (the rows of a full tile: 6 or 12).
 * moekit/kernels/library.py hashes this header with the .c files, so a change here rebuilds
 * the kernels.
 */
#ifndef MOEKIT_CPU_TILES_H
#define MOEKIT_CPU_TILES_H

/* f(rows, ...) with rows the constant equal to mr (1 to MR): each row count inlined with
 * its own arithmetic, so that a segment's last rows (32 = 2 x 12 + 8) cost only their own */
#if MR > 6
#define ROWS_ABOVE_6(f, ...)                                                                                          \
    case 12: f(12, __VA_ARGS__); break;                                                                              \
    case 11: f(11, __VA_ARGS__); break;                                                                              \
    case 10: f(10, __VA_ARGS__); break;                                                                              \
    case 9: f(9, __VA_ARGS__); break;                                                                                \
    case 8: f(8, __VA_ARGS__); break;                                                                                \
    case 7: f(7, __VA_ARGS__); break;
#else
#define ROWS_ABOVE_6(f, ...)
#endif
#define BY_ROWS(mr, f, ...)                                                                                           \
    switch (mr) {                                                                                                     \
        ROWS_ABOVE_6(f, __VA_ARGS__)                                                                                  \
    case 6: f(6, __VA_ARGS__); break;                                                                                \
    case 5: f(5, __VA_ARGS__); break;                                                                                \
    case 4: f(4, __VA_ARGS__); break;                                                                                \
    case 3: f(3, __VA_ARGS__); break;                                                                                \
    case 2: f(2, __VA_ARGS__); break;                                                                                \
    default: f(1, __VA_ARGS__); break;                                                                               \
    }

#endif
