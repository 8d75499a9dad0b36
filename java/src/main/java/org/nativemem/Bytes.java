package org.nativemem;

import java.util.Locale;

/**
 * Byte counts in the units nativemem's usage reports, errors and logs print them in: binary
 * units with one decimal ({@code 512 B}, {@code 8.0 MiB}, {@code 1.5 GiB}). For engines and jobs
 * that log sizes next to nativemem's own text.
 */
public final class Bytes {
    private static final String[] UNITS = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};

    private Bytes() {
    }

    /**
     * @param bytes a byte count (negative counts keep their sign)
     * @return e.g. {@code "512 B"}, {@code "8.0 MiB"}, {@code "1.5 GiB"}
     */
    public static String human(long bytes) {
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
