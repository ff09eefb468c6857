package mrl.oip;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.TimeUnit;

/**
 * Greedy batching for TorchServe 0.12: a worker takes what is queued, up to the batch size, and
 * never waits for more.
 *
 * <p>TorchServe's worker polls its model's queue for the first request of a batch (blocking), then
 * for up to batchSize - 1 more, each poll waiting what is left of maxBatchDelay. So a lone request
 * always waits maxBatchDelay, and maxBatchDelay cannot be 0: an archive's 0 is read as "unset", 100
 * ms (ModelManager), and a 0 given to the register API ends every batch after its second request
 * (Model.pollInferJob breaks once the delay left is 0; measured: 16 clients, mean batch 2.0). Under
 * load the queue is never empty when a batch is taken, so the wait only ever delays requests that
 * arrive alone. This is what Triton does by default (max_queue_delay_microseconds 0).
 *
 * <p>The agent rewrites, as the JVM loads org.pytorch.serve.wlm.Model, its calls of
 * LinkedBlockingDeque.poll(long, TimeUnit) into calls of {@link #poll} here: the constant pool
 * gains a method reference and each call's 3-byte invokevirtual becomes a 3-byte invokestatic of
 * the same stack shape, so nothing else in the class moves. Started with -Dmrl.batching=greedy
 * (config.properties); without it the agent leaves Model as it is.
 */
public final class GreedyBatching {
    static final String TARGET = "org/pytorch/serve/wlm/Model";
    /** TorchServe 0.12.0's Model polls its queues in exactly this many places (javap). */
    static final int SITES = 6;

    private static final String DEQUE = "java/util/concurrent/LinkedBlockingDeque";
    private static final String POLL_DESC = "(JLjava/util/concurrent/TimeUnit;)Ljava/lang/Object;";
    private static final String HELPER = "mrl/oip/GreedyBatching";
    private static final String HELPER_DESC =
            "(Ljava/util/concurrent/LinkedBlockingDeque;JLjava/util/concurrent/TimeUnit;)Ljava/lang/Object;";
    private static final int INVOKEVIRTUAL = 0xb6;
    private static final int INVOKESTATIC = 0xb8;

    private GreedyBatching() {}

    /**
     * What the rewritten calls run: a wait for ever (the first request of a batch) stays one;
     * any other poll takes the head of the queue, or nothing, at once.
     */
    public static <E> E poll(LinkedBlockingDeque<E> queue, long timeout, TimeUnit unit)
            throws InterruptedException {
        return timeout == Long.MAX_VALUE ? queue.poll(timeout, unit) : queue.poll();
    }

    /** Model's class file with its queue polls sent to {@link #poll}; IllegalStateException if it
     * does not hold exactly {@link #SITES} of them (another TorchServe: leave it unpatched). */
    static byte[] patch(byte[] klass) {
        ByteBuffer in = ByteBuffer.wrap(klass);
        in.position(8); // magic, minor, major
        int count = in.getShort() & 0xffff;
        int[] tag = new int[count];
        int[] a = new int[count];
        int[] b = new int[count];
        String[] utf8 = new String[count];
        for (int i = 1; i < count; i++) {
            tag[i] = in.get() & 0xff;
            switch (tag[i]) {
                case 1: {
                    byte[] s = new byte[in.getShort() & 0xffff];
                    in.get(s);
                    utf8[i] = new String(s, StandardCharsets.UTF_8); // modified UTF-8: ASCII here
                    break;
                }
                case 7: case 8: case 16: case 19: case 20:
                    a[i] = in.getShort() & 0xffff;
                    break;
                case 15:
                    in.get();
                    a[i] = in.getShort() & 0xffff;
                    break;
                case 3: case 4:
                    in.getInt();
                    break;
                case 5: case 6:
                    in.getLong();
                    i++; // an 8-byte constant takes two entries
                    break;
                case 9: case 10: case 11: case 12: case 17: case 18:
                    a[i] = in.getShort() & 0xffff;
                    b[i] = in.getShort() & 0xffff;
                    break;
                default:
                    throw new IllegalStateException("constant pool tag " + tag[i] + " at entry " + i);
            }
        }
        int poolEnd = in.position();
        int target = -1;
        for (int i = 1; i < count; i++) {
            if (tag[i] == 10 && DEQUE.equals(utf8[a[a[i]]])
                    && "poll".equals(utf8[a[b[i]]]) && POLL_DESC.equals(utf8[b[b[i]]])) {
                target = i;
            }
        }
        if (target < 0) {
            throw new IllegalStateException("no LinkedBlockingDeque.poll(long, TimeUnit) in " + TARGET);
        }
        int helper = count + 5; // the Methodref appended below
        List<Integer> sites = new ArrayList<>();
        for (int p = poolEnd; p + 2 < klass.length; p++) {
            if ((klass[p] & 0xff) == INVOKEVIRTUAL && (klass[p + 1] & 0xff) == target >> 8
                    && (klass[p + 2] & 0xff) == (target & 0xff)) {
                sites.add(p);
            }
        }
        if (sites.size() != SITES) {
            throw new IllegalStateException(TARGET + " polls its queues in " + sites.size()
                    + " places, not the " + SITES + " of TorchServe 0.12.0");
        }
        try {
            ByteArrayOutputStream added = new ByteArrayOutputStream();
            DataOutputStream out = new DataOutputStream(added);
            out.writeByte(1);
            out.writeUTF(HELPER);                 // count
            out.writeByte(7);
            out.writeShort(count);                // count + 1: Class
            out.writeByte(1);
            out.writeUTF("poll");                 // count + 2
            out.writeByte(1);
            out.writeUTF(HELPER_DESC);            // count + 3
            out.writeByte(12);
            out.writeShort(count + 2);
            out.writeShort(count + 3);            // count + 4: NameAndType
            out.writeByte(10);
            out.writeShort(count + 1);
            out.writeShort(count + 4);            // count + 5: Methodref
            out.flush();
            byte[] extra = added.toByteArray();
            byte[] patched = new byte[klass.length + extra.length];
            System.arraycopy(klass, 0, patched, 0, poolEnd);
            System.arraycopy(extra, 0, patched, poolEnd, extra.length);
            System.arraycopy(klass, poolEnd, patched, poolEnd + extra.length, klass.length - poolEnd);
            patched[8] = (byte) ((count + 6) >> 8);
            patched[9] = (byte) (count + 6);
            for (int p : sites) {
                int q = p + extra.length;
                patched[q] = (byte) INVOKESTATIC;
                patched[q + 1] = (byte) (helper >> 8);
                patched[q + 2] = (byte) helper;
            }
            return patched;
        } catch (IOException e) {
            throw new IllegalStateException(e);
        }
    }
}
