package org.nativemem.spark;

import java.util.Locale;

/** Byte counts in human units, as the native usage reports print them ({@code 1.5 GiB}). */
final class Sizes {
    private static final String[] UNITS = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};

    private Sizes() {
    }

    /**
     * @param bytes a byte count
     * @return e.g. {@code "512 B"}, {@code "8.0 MiB"}, {@code "1.5 GiB"}
     */
    static String human(long bytes) {
        if (bytes < 1024 && bytes > -1024) {
            return bytes + " B";
        }
        double value = Math.abs((double) bytes);
        int unit = 0;
        while (value >= 1024 && unit < UNITS.length - 1) {
            value /= 1024;
            unit++;
        }
        return String.format(Locale.ROOT, "%s%.1f %s", bytes < 0 ? "-" : "", value, UNITS[unit]);
    }
}
